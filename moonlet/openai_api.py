"""The OpenAI protocol as moonlet speaks it: request validation (4xx OpenAI error objects for bad input), the
prompt a request becomes (the K2 template for chat, the text or ids as given for completions), and the choice
objects that turn engine tokens into OpenAI shapes (chat: through the K2 parser into message / delta; text
completions: plain text). No HTTP here: server.py serves it.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

from moonlet.sampling import MAX_LOGPROBS

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request (/v1/completions takes a batch of prompts)
ADJUSTMENTS = ("min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logit_bias")
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """A request the server refuses, turned into an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------- validation

def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{key}' must be {kind} in [{lo}, {hi}], got {v!r}", key, "invalid_value")
    return v


def _tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def _check_body(body: Any, model_name: str) -> None:
    """Every POST route's body: a JSON object naming this server's model or none."""
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{model_name}'",
                       "model", "model_not_found")


def _sampling(body: Any, model_name: str, max_model_len: int) -> dict:
    """The fields chat and text completions share: model, sampling, stop, stream, n."""
    _check_body(body, model_name)
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict) or len(bias) > 300 or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, (int, float)) and not isinstance(v, bool)
            and -100 <= v <= 100 for k, v in bias.items()):
        raise APIError(400, "'logit_bias' maps token ids (as strings) to biases in [-100, 100], at most 300 of "
                       "them", "logit_bias")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 16 of them", "stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {stream!r}", "stream")
    opts = body.get("stream_options")
    if opts is not None and (not stream or not isinstance(opts, dict)):
        raise APIError(400, "'stream_options' is an object and is only allowed with stream=true", "stream_options")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: benchmarks generate exactly max_tokens
    if not isinstance(ignore_eos, bool):
        raise APIError(400, f"'ignore_eos' must be a boolean, got {ignore_eos!r}", "ignore_eos")
    top_k = _number(body, "top_k", 0, -1, 1 << 30, integer=True)
    return_token_ids = body.get("return_token_ids", False)  # vLLM's extension: the ids RL code trains on
    if not isinstance(return_token_ids, bool):
        raise APIError(400, f"'return_token_ids' must be a boolean, got {return_token_ids!r}", "return_token_ids")
    prompt_logprobs = _number(body, "prompt_logprobs", None, 0, MAX_LOGPROBS, integer=True)  # vLLM's extension
    if prompt_logprobs is not None and stream:
        raise APIError(400, "'prompt_logprobs' is not supported with stream=true (as in vLLM): the prompt's scores "
                       "come in the one response object", "prompt_logprobs", "unsupported_parameter")
    return {
        "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
        "top_k": max(0, top_k), "min_p": float(_number(body, "min_p", 0.0, 0.0, 1.0)),
        "presence_penalty": float(_number(body, "presence_penalty", 0.0, -2, 2)),
        "frequency_penalty": float(_number(body, "frequency_penalty", 0.0, -2, 2)),
        "repetition_penalty": float(_number(body, "repetition_penalty", 1.0, 1e-3, 10)),  # vLLM's extensions:
        "min_tokens": _number(body, "min_tokens", 0, 0, max_model_len, integer=True),  # these two and min_p
        "logit_bias": {int(k): float(v) for k, v in bias.items()} or None, "seed": _number(body, "seed", None, 0, (1 << 63) - 1 - MAX_CHOICES, integer=True),
        "n": _number(body, "n", 1, 1, MAX_N, integer=True),
        "max_thinking_tokens": _number(body, "max_thinking_tokens", None, 0, max_model_len, integer=True),
        "stop": tuple(stop), "ignore_eos": ignore_eos, "stream": stream,
        "include_usage": bool((opts or {}).get("include_usage")),
        "stop_token_ids": (),  # what a route adds (chat: the tool section's marker)
        "prompt_logprobs": prompt_logprobs,  # what the engine computes (/v1/completions: echo + logprobs too)
        "vllm_prompt_logprobs": prompt_logprobs,  # what the response reports in vLLM's shape
        "return_token_ids": return_token_ids,
    }


def _conversation(body: dict) -> tuple[list[dict], list[dict] | None]:
    """A chat body's messages (developer read as system, `reasoning` as `reasoning_content`) and tools."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of message objects", "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}]: expected an object with 'role' in {list(ROLES)}, got {str(m)[:80]}",
                           f"messages[{i}].role")
        m = dict(m)
        if m["role"] == "developer":
            m["role"] = "system"
        if m.get("reasoning_content") is None and isinstance(m.get("reasoning"), str):
            m["reasoning_content"] = m["reasoning"]
        messages.append(m)
    tools = body.get("tools") or None
    if tools is not None:
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) and t["function"]["name"] for t in tools):
            raise APIError(400, "'tools' must be a list of {'type': 'function', 'function': {'name': ...}}", "tools")
    return messages, tools


def validate(body: Any, model_name: str, max_model_len: int, default_max_tokens: int) -> dict:
    """A chat-completions body -> the fields the server acts on; raises APIError (4xx) for anything it cannot
    serve."""
    req = _sampling(body, model_name, max_model_len)
    messages, tools = _conversation(body)
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if not tools or name not in _tool_names(tools):
            raise APIError(400, f"'tool_choice' names function {name!r}, which is not in 'tools'", "tool_choice")
        choice = {"name": name}
    elif choice not in ("auto", "none", "required"):
        raise APIError(400, f"'tool_choice' must be 'auto', 'none', 'required' or "
                       f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}", "tool_choice")
    elif choice == "required" and not tools:
        raise APIError(400, "'tool_choice' is 'required' but no 'tools' were given", "tool_choice")
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise APIError(400, f"'logprobs' must be a boolean, got {logprobs!r}", "logprobs")
    top_logprobs = _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
    if top_logprobs and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported", "response_format",
                       "unsupported_parameter")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise APIError(400, f"'parallel_tool_calls' must be a boolean, got {parallel!r}", "parallel_tool_calls")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return req | {
        "messages": messages, "tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel,
        "max_tokens": _number(body, max_key, None, 1, max_model_len, integer=True), "max_key": max_key,
        "default_max_tokens": default_max_tokens, "logprobs": top_logprobs if logprobs else None,
    }


def validate_completion(body: Any, model_name: str, max_model_len: int) -> dict:
    """A (legacy, text-in text-out) completions body -> the fields the server acts on. `prompt` is a string, a
    list of token ids, or a batch of either; its text is read with special tokens (a raw K2 turn works)."""
    req = _sampling(body, model_name, max_model_len)
    prompt = body.get("prompt")
    batch = prompt if isinstance(prompt, list) and prompt and all(isinstance(x, (str, list)) for x in prompt) \
        else [prompt]
    for i, x in enumerate(batch):
        ok = (isinstance(x, str) and x) or (isinstance(x, list) and x and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x))
        if not ok:
            where = "'prompt'" if len(batch) == 1 else f"prompt[{i}]"
            raise APIError(400, f"{where} must be a non-empty string or list of token ids, got {str(x)[:80]}", "prompt")
    if len(batch) * req["n"] > MAX_CHOICES:
        raise APIError(400, f"{len(batch)} prompts x n={req['n']} is over {MAX_CHOICES} choices a request", "prompt")
    if body.get("suffix"):
        raise APIError(400, "'suffix' (insertion) is not supported: K2 has no fill-in-the-middle format", "suffix",
                       "unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and best_of != req["n"]:
        raise APIError(400, "'best_of' other than n is not supported (moonlet does not rank choices)", "best_of",
                       "unsupported_parameter")
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise APIError(400, f"'echo' must be a boolean, got {echo!r}", "echo")
    logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    max_tokens = _number(body, "max_tokens", None, 0, max_model_len, integer=True)
    if max_tokens == 0 and not echo:  # OpenAI's legacy scoring call: echo, logprobs, max_tokens 0
        raise APIError(400, "'max_tokens' 0 generates nothing: it is for scoring the prompt, with 'echo' (and "
                       "'logprobs')", "max_tokens", "invalid_value")
    return req | {"prompts": batch, "echo": echo, "logprobs": logprobs, "max_key": "max_tokens",
                  "prompt_logprobs": max((k for k in (req["prompt_logprobs"], logprobs if echo else None)
                                          if k is not None), default=None),  # echo + logprobs scores the prompt too
                  "max_tokens": max_tokens}


def tokenize(body: Any, model_name: str, tokenizer, max_model_len: int) -> dict:
    """vLLM's POST /tokenize: a `prompt` as /v1/completions reads it, or `messages` (+ `tools`) as the chat route
    renders them -> {count, max_model_len, tokens[, token_strs]}: what a client counts its context with."""
    from moonlet import chat

    _check_body(body, model_name)
    if ("prompt" in body) == ("messages" in body):
        raise APIError(400, "give either 'prompt' (text) or 'messages' (a chat)", "prompt")
    if "prompt" in body:
        if not isinstance(body["prompt"], str):
            raise APIError(400, "'prompt' must be a string", "prompt")
        ids = tokenizer.encode(body["prompt"], allow_special=True)
    else:
        messages, tools = _conversation(body)
        gen = body.get("add_generation_prompt", True)
        if not isinstance(gen, bool):
            raise APIError(400, f"'add_generation_prompt' must be a boolean, got {gen!r}", "add_generation_prompt")
        try:
            ids, _ = chat.render_ids(messages, tokenizer, tools=tools, add_generation_prompt=gen)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from e
    out = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
    if body.get("return_token_strs"):
        out["token_strs"] = [token_text(tokenizer, t)[0] for t in ids]
    return out


def detokenize(body: Any, model_name: str, tokenizer) -> dict:
    """vLLM's POST /detokenize: {tokens} -> {prompt}, the text with special tokens by name."""
    _check_body(body, model_name)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < tokenizer.vocab_size for t in ids):
        raise APIError(400, f"'tokens' must be a list of token ids in [0, {tokenizer.vocab_size})", "tokens")
    return {"prompt": tokenizer.decode(ids)}


def completion_prompts(req: dict, tokenizer, max_model_len: int) -> list[list[int]]:
    """The prompts' token ids, checked against the vocabulary and the context (max_tokens defaults to 16, as
    OpenAI's and vLLM's completions do)."""
    prompts = []
    for x in req["prompts"]:
        ids = tokenizer.encode(x, allow_special=True) if isinstance(x, str) else x
        bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size})",
                           "prompt", "invalid_value")
        prompts.append(ids)
    longest = max(len(ids) for ids in prompts)
    room = max_model_len - longest
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the prompt takes "
                       f"{longest} tokens. Shorten the prompt.", "prompt", "context_length_exceeded")
    if req["max_tokens"] is None:
        req["max_tokens"] = min(room, 16)
    elif longest + req["max_tokens"] > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{longest + req['max_tokens']} tokens ({longest} in the prompt, {req['max_tokens']} in "
                       f"'max_tokens'). Reduce the length of the prompt or 'max_tokens'.", "max_tokens",
                       "context_length_exceeded")
    return prompts


def _n_calls(messages: list[dict]) -> int:
    return sum(len(m.get("tool_calls") or []) for m in messages if m["role"] == "assistant")


def build_prompt(req: dict, tokenizer, max_model_len: int) -> tuple[list[int], list[int]]:
    """Render the conversation with K2's template -> (prompt ids, forced output prefix ids).

    tool_choice 'none' leaves the tools undeclared. 'required' and a named function prefill the assistant
    turn up to the call id (`<think></think>` + tool section + `functions.` [+ NAME:IDX]): the K2 template
    has no other way to force a call without constrained decoding, so such turns carry no reasoning."""
    from moonlet import chat

    choice = req["tool_choice"]
    tools = None if choice == "none" else req["tools"]
    try:
        ids, _ = chat.render_ids(req["messages"], tokenizer, tools=tools, add_generation_prompt=True)
    except ValueError as e:
        raise APIError(400, str(e), "messages") from e
    prefix: list[int] = []
    if choice == "required" or isinstance(choice, dict):
        sp = tokenizer.special
        call_id = f"functions.{choice['name']}:{_n_calls(req['messages'])}" if isinstance(choice, dict) else "functions."
        prefix = [sp[chat.THINK], sp[chat.THINK_END], sp[chat.SECTION_BEGIN], sp[chat.CALL_BEGIN]]
        prefix += tokenizer.encode(call_id)
        if isinstance(choice, dict):
            prefix.append(sp[chat.ARG_BEGIN])
    n_prompt = len(ids) + len(prefix)
    room = max_model_len - n_prompt
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the messages "
                       f"take {n_prompt} tokens. Shorten the conversation.", "messages", "context_length_exceeded")
    if req["max_tokens"] is None:
        req["max_tokens"] = min(room, req["default_max_tokens"])
    elif n_prompt + req["max_tokens"] > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{n_prompt + req['max_tokens']} tokens ({n_prompt} in the messages, {req['max_tokens']} in "
                       f"'{req['max_key']}'). Reduce the length of the messages or '{req['max_key']}'.",
                       req["max_key"], "context_length_exceeded")
    return ids + prefix, prefix



def usage_of(reqs: list, n: int = 1) -> dict:
    """OpenAI's usage of a request's choices: each prompt counted once (the n choices of a prompt share it)."""
    us = [r.usage for r in reqs]
    firsts = us[::n]
    prompt = sum(u.get("prompt_tokens", 0) for u in firsts)
    completion = sum(u.get("completion_tokens", 0) for u in us)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(u.get("cached_tokens", 0) for u in firsts)},
            "completion_tokens_details": {"reasoning_tokens": sum(u.get("reasoning_tokens", 0) for u in us)}}


def token_text(tokenizer, token_id: int) -> tuple[str, list[int] | None]:
    """One id's text and bytes as OpenAI reports a token (special tokens by name)."""
    try:
        b = tokenizer.token_bytes(token_id)
    except KeyError:  # an id the model has but the tokenizer does not (a padded vocabulary)
        return f"<id {token_id}>", None
    return b.decode("utf-8", "replace"), list(b)


def vllm_prompt_logprobs(request, tokenizer, k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs` field: for each prompt token after the first, {token id: {logprob, rank,
    decoded_token}} for that token and the k most likely ones (None first: nothing predicts the first token)."""
    def entry(token: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": token_text(tokenizer, token)[0]}

    out: list[dict | None] = [None]
    for token, x in zip(request.prompt_ids[1:], request.prompt_logprobs[1:]):
        d = {str(token): entry(token, x.logprob, x.rank)}
        for rank, (alt, v) in enumerate(x.top[:k], 1):
            d.setdefault(str(alt), entry(alt, v, rank))
        out.append(d)
    return out


class _Choice:
    """What the two routes' choices share: one engine request, its wire shapes for the SSE writer and the server
    (opening, chunk, result), and how far its output tokens are reported: a token's logprobs (and, with vLLM's
    return_token_ids, its id) ride on the first chunk at or after it."""
    PROMPT_IN_CHOICE = True  # where vLLM's prompt fields go: in each choice, or (chat) once in the response

    def __init__(self, index: int, request, tokenizer, return_token_ids: bool):
        self.index, self.request, self.tokenizer, self.return_token_ids = index, request, tokenizer, return_token_ids
        self._logprobs_sent = self._ids_sent = 0  # output tokens whose logprobs / ids are out

    def logprobs_until(self, end: int) -> dict | None:
        raise NotImplementedError

    def _delta_json(self, delta: dict) -> str:
        raise NotImplementedError

    def _body(self) -> dict:
        raise NotImplementedError

    def finish_reason(self) -> str:
        return self.request.finish_reason or "stop"

    def chunk(self, delta: dict, finish: str | None = None, end: int | None = None) -> str:
        """The JSON of one streamed choice after its index (the SSE writer builds the rest once per stream), with
        the output tokens up to `end` not yet reported."""
        out = (f'{self._delta_json(delta)}, "logprobs": {json.dumps(None if end is None else self.logprobs_until(end))}'
               f', "finish_reason": {json.dumps(finish)}')
        if self.return_token_ids:
            start, self._ids_sent = self._ids_sent, max(self._ids_sent, end or 0)
            out += f', "token_ids": {json.dumps(self.request.output_ids[start:end or 0])}'
        return out

    def result(self) -> dict:
        out = {"index": self.index, **self._body(), "logprobs": self.logprobs_until(len(self.request.output_ids)),
               "finish_reason": self.finish_reason()}
        if self.return_token_ids:
            out["token_ids"] = list(self.request.output_ids)
        return out


class Choice(_Choice):
    """One engine request of /v1/chat/completions streamed through the K2 parser, with parallel_tool_calls=false
    applied."""
    OBJECT, CHUNK_OBJECT, ID_PREFIX = "chat.completion", "chat.completion.chunk", "chatcmpl-"
    PROMPT_IN_CHOICE = False

    def __init__(self, index: int, request, tokenizer, prefix: list[int], parallel: bool,
                 return_token_ids: bool = False):
        from moonlet.chat import StreamParser

        super().__init__(index, request, tokenizer, return_token_ids)
        self.parallel = parallel
        self.parser = StreamParser(tokenizer)
        self.pending = self._filter(self.parser.feed_ids(prefix)) if prefix else []

    def _filter(self, deltas: list[dict]) -> list[dict]:
        if self.parallel:
            return deltas
        out = []
        for d in deltas:
            if "tool_calls" in d:
                d = {"tool_calls": [c for c in d["tool_calls"] if c["index"] == 0]}
                if not d["tool_calls"]:
                    continue
            out.append(d)
        return out

    def feed(self, token: int) -> list[dict]:
        return self._filter(self.parser.feed_ids(token))

    def finish(self) -> list[dict]:
        return self._filter(self.parser.finish())

    def finish_reason(self) -> str:
        r = super().finish_reason()
        cut = self.parser.cut_call
        visible = len(self.parser.tool_calls) if self.parallel else min(1, len(self.parser.tool_calls))
        if r == "stop" and visible and (cut is None or cut >= visible):
            return "tool_calls"  # not for a call a stop string cut off: its arguments are half a JSON object
        return r

    def _token(self, token_id: int, logprob: float) -> dict:
        text, b = token_text(self.tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": b}

    def logprobs_until(self, end: int) -> dict | None:
        """OpenAI's logprobs object for the output tokens not yet reported, up to `end` (None when the request
        did not ask). Every generated token is in it: reasoning, tool-call markers and answer alike (as vLLM
        reports them); one the engine did not sample (text re-encoded before a stop string) is left out."""
        lps = self.request.output_logprobs
        if lps is None:
            return None
        ids, start = self.request.output_ids, self._logprobs_sent
        self._logprobs_sent = max(start, end)
        return {"content": [self._token(ids[i], lps[i].logprob) | {"top_logprobs": [self._token(t, v) for t, v in lps[i].top]}
                            for i in range(start, end) if lps[i] is not None]}

    def message(self) -> dict:
        res = self.parser.result()
        calls = [{"id": c["id"], "type": "function", "function": dict(c["function"])} for c in res["tool_calls"]]
        calls = calls if self.parallel else calls[:1]
        msg: dict = {"role": "assistant", "content": res["content"] if res["content"] or not calls else None,
                     "reasoning_content": res["reasoning_content"], "reasoning": res["reasoning_content"]}
        if calls:
            msg["tool_calls"] = calls
        return msg


    def opening(self) -> list[dict]:
        return [{"role": "assistant", "content": ""}, *self.pending]

    def _delta_json(self, delta: dict) -> str:
        return f'"delta": {json.dumps(openai_delta(delta))}'

    def _body(self) -> dict:
        return {"message": self.message()}


def openai_delta(d: dict) -> dict:
    if "reasoning_content" in d:
        return {"reasoning_content": d["reasoning_content"], "reasoning": d["reasoning_content"]}
    return d


class TextChoice(_Choice):
    """One engine request of /v1/completions: the generated tokens as plain text (special tokens by name, as the
    model wrote them), after the echoed prompt when asked; logprobs in that endpoint's legacy shape."""
    OBJECT = CHUNK_OBJECT = "text_completion"
    ID_PREFIX = "cmpl-"

    def __init__(self, index: int, request, tokenizer, echo: bool = False, return_token_ids: bool = False):
        super().__init__(index, request, tokenizer, return_token_ids)
        self._prompt_ids_sent = not return_token_ids  # streamed: the prompt's ids ride on the choice's first chunk
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self._offsets: list[int] = []  # where each token's text starts in self.text: the echoed prompt's, then the output's
        for t in request.prompt_ids if echo else ():
            self.feed(t)
        self._echoed = len(self._offsets)
        self._prompt_reported = not echo
        self.pending = [{"text": self.text}] if self.text else []

    def _add(self, text: str) -> list[dict]:
        self.text += text
        return [{"text": text}] if text else []

    def feed(self, token: int) -> list[dict]:
        self._offsets.append(len(self.text))
        return self._add(self._utf8.decode(bytes(token_text(self.tokenizer, token)[1] or b"")))

    def finish(self) -> list[dict]:
        return self._add(self._utf8.decode(b"", final=True))

    def logprobs_until(self, end: int) -> dict | None:
        """{tokens, token_logprobs, top_logprobs, text_offset} for the output tokens not yet reported, up to `end`
        (fed already), after the echoed prompt's the first time (its first token has none, as OpenAI reports);
        None when the request did not ask."""
        r = self.request
        if r.output_logprobs is None:
            return None
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        k = r.params.logprobs  # (the prompt's may have more alternatives, for prompt_logprobs)

        def add(token: int, lp, offset: int) -> None:
            out["tokens"].append(token_text(self.tokenizer, token)[0])
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else {token_text(self.tokenizer, t)[0]: v
                                                                for t, v in lp.top[:k]})
            out["text_offset"].append(offset)

        if not self._prompt_reported:
            self._prompt_reported = True
            for token, lp, offset in zip(r.prompt_ids, r.prompt_logprobs or (), self._offsets):
                add(token, lp, offset)
        start, self._logprobs_sent = self._logprobs_sent, max(self._logprobs_sent, end)
        for i in range(start, end):
            if r.output_logprobs[i] is not None:
                add(r.output_ids[i], r.output_logprobs[i], self._offsets[self._echoed + i])
        return out

    def opening(self) -> list[dict]:
        return self.pending

    def _delta_json(self, delta: dict) -> str:
        out = f'"text": {json.dumps(delta.get("text", ""))}'
        if not self._prompt_ids_sent:
            self._prompt_ids_sent = True
            out += f', "prompt_token_ids": {json.dumps(self.request.prompt_ids)}'
        return out

    def _body(self) -> dict:
        return {"text": self.text} | ({"prompt_token_ids": list(self.request.prompt_ids)} if self.return_token_ids
                                      else {})
