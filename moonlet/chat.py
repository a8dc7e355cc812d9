"""K2 Thinking's chat format: render messages to text or ids (+ SFT loss mask), parse and stream-parse output.

Rendering follows K2 Thinking's chat template (K2_SPEC.md section 4; moonshotai/Kimi-K2-Thinking
chat_template.jinja), with no newlines between segments:

    <|im_system|>tool_declare<|im_middle|>{tools JSON, compact}<|im_end|>          (only with tools)
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
                                                       (only when the first message is not a system one)
    <|im_user|>{name or role}<|im_middle|>{content}<|im_end|>
    <|im_assistant|>{name or role}<|im_middle|><think>{reasoning}</think>{content}
        <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{args}
        <|tool_call_end|>...<|tool_calls_section_end|><|im_end|>
    <|im_system|>{name or role}<|im_middle|>## Return of {tool_call_id}\\n{content}<|im_end|>   (tool results)
    <|im_assistant|>assistant<|im_middle|>                                        (generation prompt)

Reasoning is dropped (`<think></think>`) for assistant messages up to and including the last assistant
message without tool calls; the ones after it (the live tool-calling episode) keep it. Tool-call ids are
`functions.{name}:{idx}` with idx counting calls over the whole conversation (the spec's rule, as K2-Instruct's
template does it): the caller's ids are replaced and tool results that refer to them are rewritten to match.
K2 numbers its own calls this way, so re-rendering the model's own output is byte-identical. Tool-call arguments may be a JSON string
(rendered verbatim) or a dict (json.dumps, ensure_ascii=False, like the template's `tojson`).

Parsing (`parse`, `StreamParser`) reads model output that follows the generation prompt: reasoning runs
from the start (a leading `<think>` is consumed) to `</think>`; `<|tool_calls_section_begin|>` also ends it;
content is the text between `</think>` and the tool section; calls carry `id` (between
`<|tool_call_begin|>` and `<|tool_call_argument_begin|>`, name = id without `functions.` and `:idx`) and
`arguments` (up to `<|tool_call_end|>`, outer whitespace stripped). Reasoning and content are returned
verbatim. `<|im_end|>` / `[EOS]` end the message. Nothing raises: problems go to `errors`.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."

IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>")
THINK, THINK_END = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

_K2_ID = re.compile(r"functions\.(.+):(\d+)", re.DOTALL)

# ---------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------

# A rendered conversation is a list of segments (text, is_special, trainable). Special segments are the
# template's own tokens; everything from messages is text, so a user typing "<|im_end|>" stays text.
Segment = tuple[str, bool, bool]


def _content_text(msg: dict, i: int) -> str:
    c = msg.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for part in c:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ValueError(f"messages[{i}].content: only text parts are supported, got {part!r:.80}")
        return "".join(parts)
    raise ValueError(f"messages[{i}].content: expected a string, a list of text parts or None, got {type(c).__name__}")


def _reasoning(msg: dict) -> str:
    r = msg.get("reasoning_content")
    if r is None:
        r = msg.get("reasoning")
    return r if isinstance(r, str) else ""


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _arguments(args: Any, where: str) -> str:
    if args is None:
        return "{}"
    if isinstance(args, str):
        return args
    try:
        return json.dumps(args, ensure_ascii=False, allow_nan=False)  # NaN is no JSON: a model must not learn it
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}.function.arguments: not JSON-serializable ({e})") from e


def _assistant_body(segs: list[Segment], m: dict, i: int, keep: bool, train: bool, n_calls: int,
                    id_map: dict[str, list[str]], pending: list[str]) -> int:
    """Append an assistant message's output (everything after its header); returns the new call count."""

    def add(text: str, special: bool = False) -> None:
        if text:
            segs.append((text, special, train))

    add(THINK, True)
    add(_reasoning(m) if keep else "")
    add(THINK_END, True)
    add(_content_text(m, i))
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ValueError(f"messages[{i}].tool_calls: expected a list of tool calls, got {type(calls).__name__}")
    if calls:
        add(SECTION_BEGIN, True)
        for j, call in enumerate(calls):
            where = f"messages[{i}].tool_calls[{j}]"
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ValueError(f"{where}: expected {{'function': {{'name': str, 'arguments': ...}}}}")
            given = call.get("id")
            cid = f"functions.{fn['name']}:{n_calls}"
            if isinstance(given, str) and given:
                id_map.setdefault(given, []).append(cid)  # a caller may reuse an id: results pair in order
            pending.append(cid)
            n_calls += 1
            add(CALL_BEGIN, True)
            add(cid)
            add(ARG_BEGIN, True)
            add(_arguments(fn.get("arguments"), where))
            add(CALL_END, True)
        add(SECTION_END, True)
    add(IM_END, True)
    return n_calls


def _segments(messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
              live_final: bool = False, train_on: str = "live") -> list[Segment]:
    if not isinstance(messages, list):
        raise ValueError(f"messages: expected a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}]: expected a dict with a string 'role', got {m!r:.80}")
    # K2: assistant messages up to the last one without tool calls lose their reasoning. For SFT
    # (live_final) a trailing assistant message is the target, so the search starts before it.
    search_end = len(messages) - 1 if live_final and messages and messages[-1]["role"] == "assistant" else len(messages)
    last_plain = -1
    for i in range(search_end - 1, -1, -1):
        if messages[i]["role"] == "assistant" and not messages[i].get("tool_calls"):
            last_plain = i
            break

    segs: list[Segment] = []

    def add(text: str, special: bool = False, train: bool = False) -> None:
        if text:
            segs.append((text, special, train))

    def header(start: str, name: str) -> None:
        add(start, True)
        add(name)
        add(IM_MIDDLE, True)

    if tools:
        header(IM_SYSTEM, "tool_declare")
        add(json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
        add(IM_END, True)
    if not messages or messages[0]["role"] != "system":
        header(IM_SYSTEM, "system")
        add(DEFAULT_SYSTEM)
        add(IM_END, True)

    n_calls = 0
    id_map: dict[str, list[str]] = {}  # caller's tool-call id -> the rendered ids it was given to
    pending: list[str] = []  # rendered call ids not yet answered, for tool results without a usable id
    for i, m in enumerate(messages):
        role = m["role"]
        name = str(m.get("name") or role)
        if role == "assistant":
            header(IM_ASSISTANT, name)
            keep = i > last_plain
            train = train_on == "all" or (train_on == "live" and keep) or (train_on == "last" and i == len(messages) - 1)
            n_calls = _assistant_body(segs, m, i, keep, train, n_calls, id_map, pending)
        else:
            header(IM_USER if role == "user" else IM_SYSTEM, name)
            if role == "tool":
                tcid = m.get("tool_call_id")
                if isinstance(tcid, str) and tcid in id_map:
                    tcid = next((c for c in id_map[tcid] if c in pending), id_map[tcid][-1])
                elif not tcid:
                    tcid = pending[0] if pending else ""
                if tcid in pending:
                    pending.remove(tcid)
                add(f"## Return of {tcid}\n{_content_text(m, i)}")
            else:
                add(_content_text(m, i))
            add(IM_END, True)
    if add_generation_prompt:
        header(IM_ASSISTANT, "assistant")
    return segs


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
    """OpenAI-shaped messages (+ tools) -> the K2 Thinking prompt text, exactly as its chat template."""
    return "".join(s for s, _, _ in _segments(messages, tools, add_generation_prompt))


def render_assistant(message: dict, first_call_index: int = 0) -> str:
    """What the model generates for one assistant message after the generation prompt, rendered as a
    live message (reasoning kept): `<think>{reasoning}</think>{content}{tool calls}<|im_end|>`.
    parse() inverts it. Tool-call ids are renumbered from first_call_index, whatever ids it carries."""
    segs: list[Segment] = []
    _assistant_body(segs, message, 0, True, True, first_call_index, {}, [])
    return "".join(t for t, _, _ in segs)


def render_ids(messages: list[dict], tokenizer=None, tools: list[dict] | None = None,
               add_generation_prompt: bool = False, train_on: str = "live") -> tuple[list[int], list[int]]:
    """Render and tokenize for training or generation: returns (ids, loss_mask), same lengths.

    The template's own tokens become special ids; message text is encoded as ordinary text, so text
    that spells a special token (a user pasting "<|im_end|>") never becomes one. `ids` equals
    `tokenizer.encode(render(...), allow_special=True)` whenever messages contain no special-token text,
    with one SFT rule: without a generation prompt, a conversation that ends with an assistant message ends
    with the training target, which counts as part of the live episode (its reasoning is kept, though K2's
    template would drop it). With a generation prompt (inference) the template's rule holds as in render().
    loss_mask is 1 on an assistant message's output, from `<think>` to its closing `<|im_end|>` (reasoning,
    content, tool calls), never on headers, system, user or tool text. train_on picks which assistant
    messages: "live" (those rendered with their reasoning: the final episode), "all", or "last".
    tokenizer=None uses moonlet's default tokenizer.
    """
    if train_on not in ("live", "all", "last"):
        raise ValueError(f"train_on={train_on!r}: choose 'live', 'all' or 'last'")
    if tokenizer is None:
        from moonlet.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(None)
    ids: list[int] = []
    mask: list[int] = []
    for text, special, train in _segments(messages, tools, add_generation_prompt, live_final=not add_generation_prompt,
                                          train_on=train_on):
        piece = [tokenizer.special[text]] if special else tokenizer.encode(text)
        ids += piece
        mask += [int(train)] * len(piece)
    return ids, mask


# ---------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------

_MARKERS = (THINK, THINK_END, SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END, IM_END, "[EOS]")
# seen in the wild (vLLM's kimi_k2 parser accepts them): singular section markers
_ALIASES = {"<|tool_call_section_begin|>": SECTION_BEGIN, "<|tool_call_section_end|>": SECTION_END}
# other K2 specials that have no business in assistant output: dropped, with an error
_STRAY = ("[BOS]", IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE, "[PAD]", "[EOT]")
_ALL_MARKERS = (*_MARKERS, *_ALIASES, *_STRAY)
_MARKER_RE = re.compile("|".join(map(re.escape, sorted(_ALL_MARKERS, key=len, reverse=True))))
_PREFIXES = frozenset(m[:k] for m in _ALL_MARKERS for k in range(1, len(m)))
_MAX_MARKER = max(map(len, _ALL_MARKERS))


class StreamParser:
    """Incremental K2 output parser emitting OpenAI-shaped deltas.

    Feed model output in any split, as text (`feed_text`) or token ids (`feed_ids`, needs a tokenizer;
    special ids are the markers, ordinary ids are always text). Each call returns a list of deltas:

        {"reasoning_content": "..."}                 reasoning text
        {"content": "..."}                           answer text
        {"tool_calls": [{"index": i, "id": "functions.NAME:IDX", "type": "function",
                         "function": {"name": NAME, "arguments": ""}}]}        once per call, first
        {"tool_calls": [{"index": i, "function": {"arguments": "frag"}}]}     argument fragments

    `finish()` flushes held-back text and closes unfinished sections. `in_reasoning` is True until
    reasoning ended (`</think>` or a tool section), which is when a thinking budget stops counting;
    `done` is True after `<|im_end|>`/`[EOS]`. `result()` is the message so far in `parse()`'s shape, and
    `errors` lists what was malformed. Text that may be the start of a marker is held back until the next
    feed, so deltas never contain a partial marker; argument whitespace at the edges is held back too.
    """

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.state = "start"  # start | header | reasoning | content | section | call_id | args | after | done
        self.errors: list[str] = []
        self._text_parts: dict[str, list[str]] = {"reasoning_content": [], "content": []}  # joined on demand
        self.tool_calls: list[dict] = []
        self._buf = ""  # text not yet scanned for markers (feed_text)
        self._ws = ""  # held-back whitespace: before a leading <think>, or at the end of arguments
        self._id = ""  # tool call id text being collected
        self._out: list[dict] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._seen_think = False
        self._dropped = False
        self.cut_call: int | None = None  # the index of a tool call the output ended inside (a stop, a length)

    @property
    def reasoning(self) -> str:
        return "".join(self._text_parts["reasoning_content"])

    @property
    def content(self) -> str:
        return "".join(self._text_parts["content"])

    @property
    def in_reasoning(self) -> bool:
        return self.state in ("start", "header", "reasoning")

    @property
    def done(self) -> bool:
        return self.state == "done"

    # --- feeding ---------------------------------------------------------------------------------
    def feed_text(self, text: str) -> list[dict]:
        buf = self._buf + text
        pos = 0
        for m in _MARKER_RE.finditer(buf):
            self._text(buf[pos:m.start()])
            self._marker(_ALIASES.get(m.group(), m.group()))
            pos = m.end()
        rest = buf[pos:]
        hold = 0  # longest suffix of rest that could still grow into a marker
        for k in range(min(len(rest), _MAX_MARKER - 1), 0, -1):
            if rest[-k:] in _PREFIXES:
                hold = k
                break
        self._text(rest[:len(rest) - hold])
        self._buf = rest[len(rest) - hold:]
        return self._flush()

    def feed_ids(self, ids: list[int] | int) -> list[dict]:
        if self.tokenizer is None:
            raise ValueError("StreamParser.feed_ids needs StreamParser(tokenizer=...)")
        tok = self.tokenizer
        for i in [ids] if isinstance(ids, int) else ids:
            if tok.is_special(i):
                self._text(self._utf8.decode(b"", final=True))
                name = tok.id_to_special[i]
                if name in _ALL_MARKERS:
                    self._marker(_ALIASES.get(name, name))
                else:
                    self._error(f"stray special token {name} (id {i}) dropped")
            else:
                try:
                    data = tok.token_bytes(i)
                except (KeyError, OverflowError, ValueError):  # a model vocabulary wider than the tokenizer's
                    self._error(f"token id {i} is not in the tokenizer (vocab_size {tok.vocab_size}); dropped")
                    continue
                self._text(self._utf8.decode(data))
        return self._flush()

    def finish(self) -> list[dict]:
        self._text(self._buf + self._utf8.decode(b"", final=True))
        self._buf = ""
        if self.state == "call_id":
            self._error(f"tool call {len(self.tool_calls)}: output ended inside its id")
            if self._id.strip():
                self._open_call()
        if self.state in ("call_id", "args") and self.tool_calls:
            self.cut_call = len(self.tool_calls) - 1
        if self.state == "args":
            self._error(f"tool call {len(self.tool_calls) - 1}: output ended before <|tool_call_end|>")
            self._close_call()
        if self.state in ("section", "call_id", "args"):
            self._error("tool call section not closed (<|tool_calls_section_end|> missing)")
        if self.state in ("start", "reasoning") and (self._text_parts["reasoning_content"] or self._seen_think):
            self._error("reasoning not closed (</think> missing)")
        self.state = "done"
        return self._flush()

    def result(self) -> dict:
        return {"reasoning_content": self.reasoning, "content": self.content,
                "tool_calls": [{"id": c["id"], "type": "function", "function": dict(c["function"])}
                               for c in self.tool_calls],
                "errors": list(self.errors)}

    # --- state machine ---------------------------------------------------------------------------
    def _error(self, msg: str) -> None:
        self.errors.append(msg)

    def _emit_text(self, key: str, text: str) -> None:
        if not text:
            return
        self._text_parts[key].append(text)
        if self._out and key in self._out[-1]:
            self._out[-1][key] += text
        else:
            self._out.append({key: text})

    def _emit_args(self, text: str) -> None:
        if not text:
            return
        call = self.tool_calls[-1]
        call["function"]["arguments"] += text
        self._out.append({"tool_calls": [{"index": len(self.tool_calls) - 1, "function": {"arguments": text}}]})

    def _flush(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    def _text(self, text: str) -> None:
        if not text:
            return
        s = self.state
        if s == "header":
            return  # the header's name
        if s == "start":
            if text.strip():
                self.state = "reasoning"
                self._emit_text("reasoning_content", self._ws + text)
                self._ws = ""
            else:
                self._ws += text
        elif s == "reasoning":
            self._emit_text("reasoning_content", text)
        elif s == "content":
            self._emit_text("content", text)
        elif s == "call_id":
            self._id += text
        elif s == "args":
            body = self._ws + text
            if not self.tool_calls[-1]["function"]["arguments"]:
                body = body.lstrip()
            core = body.rstrip()
            self._emit_args(core)
            self._ws = body[len(core):]
        elif text.strip() and not self._dropped:  # section / after / done: one error per stretch
            self._dropped = True
            where = {"section": "inside the tool call section", "after": "after the tool call section",
                     "done": "after the end of the message"}[s]
            self._error(f"unexpected text {where} dropped")

    def _marker(self, m: str) -> None:
        s = self.state
        self._dropped = False
        if s == "start":
            self._ws = ""  # whitespace before the first marker is not reasoning
            if m == IM_ASSISTANT and not self._seen_think:  # tolerate a leading assistant header
                self.state = "header"
                return
        if s == "header":
            self.state = s = "start"
            if m == IM_MIDDLE:
                return
        if s == "done":
            self._error(f"{m} after the end of the message dropped")
            return
        if m in _STRAY:
            self._error(f"stray special token {m} dropped")
        elif m in (IM_END, "[EOS]"):
            if s == "args":
                self._error(f"tool call {len(self.tool_calls) - 1}: message ended before <|tool_call_end|>")
                self._close_call()
            if s in ("section", "call_id", "args"):
                self._error("tool call section not closed (<|tool_calls_section_end|> missing)")
            if s in ("start", "reasoning") and (self._text_parts["reasoning_content"] or self._seen_think):
                self._error("reasoning not closed (</think> missing)")
            self.state = "done"
        elif m == THINK:
            if s == "start" and not self._seen_think:
                self._seen_think = True
                self._ws = ""
                self.state = "reasoning"
            else:
                self._error(f"stray {THINK} dropped")
        elif m == THINK_END:
            if s in ("start", "reasoning"):
                self.state = "content"
            else:
                self._error(f"stray {THINK_END} dropped")
        elif m == SECTION_BEGIN:
            if s in ("start", "reasoning", "content", "after"):
                self._ws = ""
                self.state = "section"
            else:
                self._error(f"nested {SECTION_BEGIN} dropped")
        elif m == CALL_BEGIN:
            if s == "args":
                self._error(f"tool call {len(self.tool_calls) - 1}: <|tool_call_end|> missing")
                self._close_call()
            elif s == "call_id":
                self._error(f"tool call {len(self.tool_calls)}: <|tool_call_argument_begin|> missing")
            elif s != "section":
                self._error(f"{CALL_BEGIN} outside a tool call section (section opened)")
            self.state = "call_id"
            self._id = ""
            self._ws = ""
        elif m == ARG_BEGIN:
            if s == "call_id":
                self._open_call()
                self.state = "args"
            else:
                self._error(f"stray {ARG_BEGIN} dropped")
        elif m == CALL_END:
            if s == "args":
                self._close_call()
                self.state = "section"
            elif s == "call_id":
                self._error(f"tool call {len(self.tool_calls)}: <|tool_call_argument_begin|> missing")
                if self._id.strip():
                    self._open_call()
                    self._close_call()
                self.state = "section"
            else:
                self._error(f"stray {CALL_END} dropped")
        elif m == SECTION_END:
            if s == "args":
                self._error(f"tool call {len(self.tool_calls) - 1}: not closed before {SECTION_END}")
                self._close_call()
            elif s == "call_id":
                self._error(f"tool call {len(self.tool_calls)}: not closed before {SECTION_END}")
                if self._id.strip():
                    self._open_call()
                    self._close_call()
            elif s != "section":
                self._error(f"stray {SECTION_END} dropped")
                return
            self.state = "after"

    def _open_call(self) -> None:
        index = len(self.tool_calls)
        cid = self._id.strip()
        m = _K2_ID.fullmatch(cid)
        if m:
            name = m.group(1)
        else:
            name = cid.removeprefix("functions.")
            name = re.sub(r":\d+$", "", name)
            if not cid:
                self._error(f"tool call {index}: missing id")
                cid = f"functions.unknown:{index}"
                name = "unknown"
        self._id = ""
        self._ws = ""
        call = {"index": index, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}
        self.tool_calls.append(call)
        self._out.append({"tool_calls": [{"index": index, "id": cid, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]})

    def _close_call(self) -> None:
        self._ws = ""
        call = self.tool_calls[-1]
        try:
            json.loads(call["function"]["arguments"], parse_constant=_not_json)
        except ValueError as e:
            self._error(f"tool call {call['index']} ({call['function']['name']}): arguments are not valid JSON ({e})")


def parse(text: str) -> dict:
    """K2 output text -> {"reasoning_content", "content", "tool_calls", "errors"}; never raises.

    tool_calls are OpenAI-shaped: {"id", "type": "function", "function": {"name", "arguments"}}, arguments
    a JSON string as the model wrote it. reasoning_content and content are "" when absent.
    """
    p = StreamParser()
    p.feed_text(text)
    p.finish()
    return p.result()


def merge_deltas(deltas: list[dict]) -> dict:
    """Accumulate StreamParser deltas into one message in parse()'s shape (without errors)."""
    msg: dict = {"reasoning_content": "", "content": "", "tool_calls": []}
    for d in deltas:
        msg["reasoning_content"] += d.get("reasoning_content", "")
        msg["content"] += d.get("content", "")
        for tc in d.get("tool_calls", []):
            if "id" in tc:
                msg["tool_calls"].append({"id": tc["id"], "type": tc.get("type", "function"),
                                          "function": dict(tc["function"])})
            else:
                msg["tool_calls"][tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    return msg
