"""The think/act loop: ask the model, run the tools it calls, append the results, repeat until it answers
or a budget ends.

Choices that matter for K2 Thinking over hundreds of steps:
- the live episode's reasoning goes back to the model verbatim (Turn.to_message keeps even "");
- the parallel calls of one turn run concurrently, and their results are appended in call order with ids;
- nothing the model writes crashes the loop: bad JSON, unknown tools, schema failures, tool exceptions and
  refused repeats all come back to it as tool errors it can react to;
- identical repeated calls get a warning in their result, are refused past `repeat_limit`, and the run
  stops if the model insists (no infinite loops);
- every step is recorded (trace + live view) before the next starts, so a killed run resumes without
  re-running a finished tool call.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from moonlet.agent.backends import USAGE_KEYS, Backend, Turn, empty_usage
from moonlet.agent.context import ContextFull, ContextManager
from moonlet.agent.trace import Replay, Trace

# runs that ended this way continue on resume (with a larger budget, for the budget ones)
RESUMABLE = ("interrupted", "error", "max_steps", "max_total_tokens", "max_wall_s", "max_cost")

# approve(call, tool) -> True (run it), False (reject) or a string (reject, and tell the model why)
Approver = Callable[[dict, Any], "bool | str"]


@dataclass
class Budget:
    """When to stop. Token budgets count what a provider bills: prompt + completion tokens summed over steps.
    Prices are dollars per million tokens (K2: $0.60 input, $2.50 output, $0.15 cached input). The token, time
    and cost budgets are checked before each model call, so the call that crosses one still completes: a turn
    is never cut off for the budget, and the overshoot is at most one step."""

    max_steps: int = 300                      # model calls
    max_tokens_per_step: int = 16384          # completion tokens per call, reasoning included
    max_thinking_tokens: int | None = None    # reasoning tokens per call (the engine forces </think>)
    max_total_tokens: int | None = None
    max_wall_s: float | None = None
    max_cost: float | None = None
    price_input: float = 0.0
    price_output: float = 0.0
    price_cached: float | None = None         # None -> same as price_input

    def cost(self, usage: dict) -> float:
        cached = usage.get("cached_tokens", 0)
        p_cached = self.price_input if self.price_cached is None else self.price_cached
        return ((usage.get("prompt_tokens", 0) - cached) * self.price_input + cached * p_cached
                + usage.get("completion_tokens", 0) * self.price_output) / 1e6


@dataclass
class Result:
    answer: str
    stop_reason: str  # answer | empty (a turn with neither text nor calls) | truncated (hit max_tokens_per_step
    #                   without calls) | max_steps |
    #                   max_total_tokens | max_wall_s | max_cost | context_full | repeated_calls | interrupted | error
    steps: int
    tool_calls: int
    usage: dict
    cost: float
    elapsed: float
    messages: list[dict] = field(repr=False, default_factory=list)
    error: str | None = None  # "error" / "context_full": what went wrong (backend unreachable, prompt too long...)

    @property
    def total_tokens(self) -> int:
        return self.usage["prompt_tokens"] + self.usage["completion_tokens"]


def call_key(call: dict) -> str:
    """Identity of a call for repeat detection: name + canonical arguments."""
    fn = call["function"]
    try:
        args = json.dumps(json.loads(fn["arguments"] or "{}"), sort_keys=True)
    except (json.JSONDecodeError, TypeError):
        args = str(fn["arguments"])
    return f"{fn['name']}\x00{args}"


def parse_arguments(call: dict) -> dict:
    """The call's arguments as a dict, or ValueError with a message for the model."""
    raw = call["function"].get("arguments")
    if isinstance(raw, dict):
        return raw
    if raw is None or not raw.strip():
        return {}
    try:
        args = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"the arguments are not valid JSON ({e.msg} at char {e.pos}); send a JSON object") from None
    if not isinstance(args, dict):
        raise ValueError(f"the arguments must be a JSON object, got {type(args).__name__}")
    return args


class Agent:
    """Runs one trajectory. `tools` are moonlet Tool objects (name, description, parameters, needs_approval,
    spec(), __call__(arguments) -> str raising ToolError). `context_limit` is the model's context length in
    tokens: a prompt gets at most context_limit - budget.max_tokens_per_step of it."""

    def __init__(self, backend: Backend, tools: Sequence[Any] = (), *, budget: Budget | None = None,
                 context_limit: int | None = None, count_tokens: Callable | None = None,
                 system: str | None = None, approve: Approver | None = None, repeat_limit: int = 3,
                 temperature: float = 1.0, seed: int | None = None, trace: Trace | None = None,
                 on_record: Callable[[dict], None] | None = None, tag: dict | None = None,
                 on_delta: Callable[[dict], None] | None = None, max_workers: int = 16):
        self.backend, self.budget = backend, budget or Budget()
        self.tools = {t.name: t for t in tools}
        self.specs = [t.spec() for t in tools] or None
        self.context = None
        if context_limit is not None:
            count = count_tokens or getattr(backend, "count_tokens", None)
            self.context = ContextManager(context_limit - self.budget.max_tokens_per_step, count)
        self.system, self.approve, self.repeat_limit = system, approve, repeat_limit
        self.temperature, self.seed = temperature, seed
        self.trace, self.on_record, self.tag = trace, on_record, tag or {}
        self.on_delta = on_delta  # streamed {"reasoning_content"|"content": text} pieces, for a live view
        self.max_workers = max_workers
        self.cancel = threading.Event()  # set from another thread (heavy mode's Ctrl-C) to stop after this step

    # ---------------------------------------------------------------------------------------------- records
    def emit(self, record: dict) -> None:
        record = record | self.tag
        if self.trace is not None:
            self.trace.write(record)
        if self.on_record is not None:
            self.on_record(record)

    # ------------------------------------------------------------------------------------------------- run
    def run(self, question: str | None = None, *, messages: list[dict] | None = None,
            resume: Replay | None = None, meta: dict | None = None) -> Result:
        """Start from a question (or a message list), or continue a run rebuilt from its trace."""
        t0 = time.monotonic()
        if resume is not None:
            messages, steps, usage = [dict(m) for m in resume.messages], resume.steps, dict(resume.usage)
            elapsed0 = resume.elapsed
            if self.context is not None:
                self.context.hidden |= resume.hidden
            if resume.end is not None and resume.end["stop_reason"] not in RESUMABLE:  # finished: nothing to do
                e = resume.end
                return Result(e.get("answer", ""), e["stop_reason"], e["steps"], self._n_calls(messages),
                              e["usage"], e.get("cost", 0.0), e.get("elapsed", 0.0), messages)
        else:
            if messages is None:
                if question is None:
                    raise ValueError("Agent.run needs a question, messages, or a resume state")
                messages = [{"role": "user", "content": question}]
                if self.system:
                    messages.insert(0, {"role": "system", "content": self.system})
            messages, steps, usage, elapsed0 = list(messages), 0, empty_usage(), 0.0
            self.emit({"type": "start", "messages": list(messages), "tools": self.specs or [],
                       "meta": {"question": question} | (meta or {})})
        elapsed = lambda: elapsed0 + time.monotonic() - t0
        stop, answer, error = None, "", None
        try:
            while stop is None:
                pending = self._pending(messages)
                if pending:
                    results, stop = self._run_calls(pending, messages, steps, elapsed)
                    messages += results
                    self._in_call_order(messages)  # a resumed turn's earlier results came first
                    continue
                stop = "interrupted" if self.cancel.is_set() else self._over_budget(steps, usage, elapsed())
                if stop:
                    break
                view = messages
                if self.context is not None:
                    try:
                        view, newly = self.context.fit(messages, self.specs)
                    except ContextFull as e:
                        stop, error = "context_full", (f"{e} (the context limit less max_tokens "
                                                       f"{self.budget.max_tokens_per_step} for the reply)")
                        break
                    if newly:
                        self.emit({"type": "hide", "ids": newly})
                kw = {"on_delta": self.on_delta} if self.on_delta is not None else {}
                turn = self.backend.complete(view, self.specs, max_tokens=self.budget.max_tokens_per_step,
                                             max_thinking_tokens=self.budget.max_thinking_tokens,
                                             temperature=self.temperature, seed=self.seed, **kw)
                steps += 1
                for k in USAGE_KEYS:
                    usage[k] += int(turn.usage.get(k, 0) or 0)
                msg = self._assign_ids(turn, messages).to_message()
                messages.append(msg)
                self.emit({"type": "turn", "step": steps, "message": msg, "usage": turn.usage,
                           "finish_reason": turn.finish_reason, "elapsed": elapsed()})
                if not turn.tool_calls:
                    answer = turn.content
                    stop = {"error": "error", "length": "truncated"}.get(turn.finish_reason,
                                                                          "answer" if answer.strip() else "empty")
                    if stop == "error":
                        error = "the model's turn ended with finish_reason 'error'"
        except KeyboardInterrupt:
            stop = "interrupted"
        except Exception as e:  # the backend failed (server down, prompt too long): end resumably, never lose the trace
            stop, error = "error", f"{type(e).__name__}: {e}"
        if not answer and stop not in ("answer", "empty", "truncated"):  # a budget or a failure ended it: the last
            # thing the model said is the best we have (an empty final answer stays empty, not interim text)
            answer = next((m["content"] for m in reversed(messages) if m["role"] == "assistant" and m["content"]), "")
        res = Result(answer, stop, steps, self._n_calls(messages), usage, self.budget.cost(usage), elapsed(),
                     messages, error)
        self.emit({"type": "end", "stop_reason": stop, "answer": answer, "steps": steps,
                   "tool_calls": res.tool_calls, "usage": usage, "cost": res.cost, "elapsed": res.elapsed}
                  | ({"error": error} if error else {}))
        return res

    def _over_budget(self, steps: int, usage: dict, elapsed: float) -> str | None:
        b = self.budget
        if steps >= b.max_steps:
            return "max_steps"
        if b.max_total_tokens is not None and usage["prompt_tokens"] + usage["completion_tokens"] >= b.max_total_tokens:
            return "max_total_tokens"
        if b.max_wall_s is not None and elapsed >= b.max_wall_s:
            return "max_wall_s"
        if b.max_cost is not None and b.cost(usage) >= b.max_cost:
            return "max_cost"
        return None

    @staticmethod
    def _n_calls(messages: list[dict]) -> int:
        return sum(len(m.get("tool_calls") or []) for m in messages if m["role"] == "assistant")

    @staticmethod
    def _in_call_order(messages: list[dict]) -> None:
        """Sort the tool results after the last assistant turn into its calls' order, in place."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        order = {c["id"]: k for k, c in enumerate(messages[last].get("tool_calls") or [])}
        messages[last + 1:] = sorted(messages[last + 1:], key=lambda m: order.get(m.get("tool_call_id"), len(order)))

    @staticmethod
    def _pending(messages: list[dict]) -> list[dict]:
        """Calls of the last assistant turn that have no result yet (a fresh turn, or a resumed crash)."""
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return []
        done = {m.get("tool_call_id") for m in messages[last + 1:] if m["role"] == "tool"}
        return [c for c in messages[last].get("tool_calls") or [] if c["id"] not in done]

    def _assign_ids(self, turn: Turn, messages: list[dict]) -> Turn:
        """Give every call a unique id (K2 style `functions.{name}:{idx}`) when the model's is missing or taken."""
        seen = {c["id"] for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []}
        idx = len(seen)
        for c in turn.tool_calls:
            c.setdefault("type", "function")
            if not c.get("id") or c["id"] in seen:
                c["id"] = f"functions.{c['function']['name']}:{idx}"
                while c["id"] in seen:
                    idx += 1
                    c["id"] = f"functions.{c['function']['name']}:{idx}"
            seen.add(c["id"])
            idx += 1
        return turn

    # ------------------------------------------------------------------------------------------------ tools
    def _run_calls(self, calls: list[dict], messages: list[dict], step: int, elapsed: Callable) -> tuple:
        """Run one turn's calls: check and approve them in order, execute the runnable ones concurrently,
        record each result as it finishes, and return the tool messages in call order (+ a stop reason)."""
        hidden = self.context.hidden if self.context is not None else set()
        prior: dict[str, int] = defaultdict(int)  # identical earlier calls whose results the model can see
        seen_ids = {c["id"] for c in calls}
        for m in messages:
            if m["role"] == "assistant":
                for c in m.get("tool_calls") or []:
                    if c["id"] not in hidden and c["id"] not in seen_ids:
                        prior[call_key(c)] += 1
        earlier = dict(prior)  # before this turn: past the limit there, the model has seen a refusal
        stop = None
        outcome: dict[str, tuple[str, bool]] = {}  # id -> (content, error)
        jobs: list[tuple[dict, Any, dict, str]] = []
        for c in calls:
            name, key = c["function"]["name"], call_key(c)
            prior[key] += 1
            n = prior[key]
            tool = self.tools.get(name)
            if tool is None:
                have = ", ".join(self.tools) or "none"
                outcome[c["id"]] = (f"Error: unknown tool {name!r}; the available tools are: {have}", True)
                continue
            try:
                args = parse_arguments(c)
            except ValueError as e:
                outcome[c["id"]] = (f"Error: {name}: {e}", True)
                continue
            if n > self.repeat_limit:
                outcome[c["id"]] = (f"Error: refused: this exact call was already made {n - 1} times (the limit "
                                    f"is {self.repeat_limit}); change the arguments or give your final answer.",
                                    True)
                if earlier.get(key, 0) > self.repeat_limit:  # it repeats a call it saw refused: it is looping
                    stop = "repeated_calls"
                continue
            if getattr(tool, "needs_approval", False):
                verdict = self.approve(c, tool) if self.approve is not None else \
                    "no approver is configured for tools that need approval"
                if verdict is not True:
                    why = f" The user says: {verdict}" if isinstance(verdict, str) and verdict else ""
                    outcome[c["id"]] = (f"The user rejected this call; it was not run.{why}", True)
                    continue
            warn = (f"Warning: this exact call was already made {n - 1} time(s) in this conversation; repeating "
                    f"it is unlikely to give new information.\n") if n > 1 else ""
            jobs.append((c, tool, args, warn))

        def record(c: dict, content: str, error: bool, seconds: float = 0.0) -> None:
            self.emit({"type": "tool", "step": step, "tool_call_id": c["id"], "name": c["function"]["name"],
                       "content": content, "error": error, "seconds": round(seconds, 4), "elapsed": elapsed()})

        for c in calls:  # answered without running: record now
            if c["id"] in outcome:
                record(c, *outcome[c["id"]])
        if jobs:  # daemon threads (not an executor, which exit joins): Ctrl-C must not wait for a long tool
            todo, finished = list(jobs), queue.Queue()

            def worker() -> None:
                while todo:
                    try:
                        job = todo.pop(0)
                    except IndexError:
                        return
                    try:
                        out = _call_tool(job[1], job[2])
                    except BaseException as e:  # noqa: B036 - a tool's sys.exit() must not leave the loop waiting
                        out = (f"Error: {type(e).__name__}: {e}", True, 0.0)
                    finished.put((job, out))

            for _ in range(min(len(jobs), self.max_workers)):
                threading.Thread(target=worker, daemon=True, name="moonlet-tool").start()
            for _ in jobs:  # record each as it finishes: a crash loses no finished call
                (c, _, _, warn), (content, error, seconds) = finished.get()
                outcome[c["id"]] = (warn + content, error)
                record(c, warn + content, error, seconds)
        results = [{"role": "tool", "tool_call_id": c["id"], "content": outcome[c["id"]][0]} for c in calls]
        return results, stop


def _call_tool(tool: Any, args: dict) -> tuple[str, bool, float]:
    """(content, error, seconds). Any exception becomes an error message for the model, never a crash."""
    t = time.monotonic()
    try:
        out = tool(args)
        content, error = (out if isinstance(out, str) else json.dumps(out, default=str)), False
    except Exception as e:
        from_tool = type(e).__name__ == "ToolError"  # ToolError's message is written for the model
        content, error = (f"Error: {e}" if from_tool else f"Error: {type(e).__name__}: {e}"), True
    return content, error, time.monotonic() - t
