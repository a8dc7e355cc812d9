"""Heavy mode: N trajectories in parallel, then one reflective aggregation call (K2 Thinking: 8 trajectories,
HLE 44.9 -> 51.0).

The trajectories start from the same messages, so a local engine's prefix cache serves the shared prompt
once. The aggregation call reads the question and the N answers, each with a short summary of how it was
reached (steps, tool calls, the tail of the final reasoning), built here from the trajectory itself so it
costs no model calls. If the aggregation call fails or says nothing, a majority vote over the answers
decides.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from moonlet.agent.backends import USAGE_KEYS, Backend, Turn, empty_usage
from moonlet.agent.loop import Agent, Result
from moonlet.agent.trace import Replay, Trace, replay

AGGREGATE_PROMPT = """You are given a question and {n} candidate answers, each written by an independent \
attempt, with a short summary of how each attempt reached it. Reflect on them: which answers agree, which \
are supported by tool results, which reasoning went wrong. Then write the single best final answer, in the \
format the question asks for.

# Question
{question}

{attempts}"""


@dataclass
class HeavyResult:
    answer: str
    method: str  # "aggregate" | "vote" | "error" (every trajectory failed: no answer, nothing recorded)
    results: list[Result]
    usage: dict = field(default_factory=empty_usage)
    elapsed: float = 0.0
    aggregate: Turn | None = None
    error: str | None = None  # why the aggregation call failed, when it did

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.results)


def normalize(answer: str) -> str:
    """For voting: case, surrounding punctuation and whitespace do not make answers different."""
    return re.sub(r"\s+", " ", answer).strip().strip(".").strip().lower()


def majority_vote(answers: list[str]) -> str:
    """The most common non-empty answer (normalized); ties go to the earliest attempt."""
    keys = [normalize(a) for a in answers]
    counts = Counter(k for k in keys if k)
    if not counts:
        return ""
    best = max(counts.values())
    return next(a for a, k in zip(answers, keys) if counts.get(k) == best)


def summarize(result: Result, max_calls: int = 8, reasoning_chars: int = 400) -> str:
    """How an attempt got its answer, in a few lines: counts, the last calls with clipped results, and the
    end of its final reasoning."""
    clip = lambda s, n: s if len(s) <= n else s[: n - 3] + "..."
    calls, results = [], {}
    for m in result.messages:
        if m["role"] == "assistant":
            calls += [c for c in m.get("tool_calls") or []]
        elif m["role"] == "tool":
            results[m["tool_call_id"]] = m.get("content") or ""
    lines = [f"{result.steps} steps, {len(calls)} tool calls, stopped: {result.stop_reason}"]
    for c in calls[-max_calls:]:
        got = clip(" ".join(results.get(c["id"], "(no result)").split()), 120)
        lines.append(f"- {c['function']['name']}({clip(c['function']['arguments'], 120)}) -> {got}")
    final = next((m for m in reversed(result.messages) if m["role"] == "assistant"), None)
    if final is not None and final.get("reasoning_content"):
        r = " ".join(final["reasoning_content"].split())
        lines.append("final reasoning: " + ("..." + r[-reasoning_chars:] if len(r) > reasoning_chars else r))
    return "\n".join(lines)


def aggregation_messages(question: str, results: list[Result]) -> list[dict]:
    def answer(r: Result) -> str:
        if r.stop_reason == "answer":
            return f"## Answer\n{r.answer or '(no answer)'}"
        return f"## No answer (stopped: {r.stop_reason}); its last words\n{r.answer or '(none)'}"

    attempts = "\n\n".join(f"# Attempt {i + 1}\n## How\n{summarize(r)}\n{answer(r)}" for i, r in enumerate(results))
    return [{"role": "user", "content": AGGREGATE_PROMPT.format(n=len(results), question=question,
                                                                attempts=attempts)}]


INTERRUPT_GRACE_S = 3.0  # after Ctrl-C: how long the trajectories get to write their end records


def run_heavy(make_agent: Callable[[int], Agent], backend: Backend, question: str, n: int = 8, *,
              messages: list[dict] | None = None, trace: Trace | None = None,
              resume: list[dict] | None = None, max_tokens: int = 16384,
              max_thinking_tokens: int | None = None, temperature: float = 1.0,
              on_record: Callable[[dict], None] | None = None, meta: dict | None = None) -> HeavyResult:
    """`make_agent(i)` builds trajectory i's Agent (give each its own seed for diversity); this function tags
    its records with traj=i. `resume` is a trace's records: finished trajectories are reused, unfinished
    ones continued, a recorded aggregation returned as is."""
    t0 = time.monotonic()
    if resume is not None:
        agg = next((r for r in resume if r["type"] == "aggregate"), None)
        if agg is not None:
            reps = [replay(resume, i) for i in range(n)]
            res = [Result(r.end["answer"], r.end["stop_reason"], r.end["steps"], r.end.get("tool_calls", 0),
                          r.end["usage"], r.end.get("cost", 0.0), r.end.get("elapsed", 0.0), r.messages)
                   for r in reps]
            return HeavyResult(agg["answer"], agg["method"], res, agg.get("usage") or empty_usage())
    agents = []
    for i in range(n):
        a = make_agent(i)
        a.tag, a.trace, a.on_record = {"traj": i}, trace, on_record
        agents.append(a)
    states: list[Replay | None] = [None] * n
    if resume is not None:
        for i in range(n):
            if any(r.get("traj") == i and r["type"] == "start" for r in resume):
                states[i] = replay(resume, i)
    results: list[Result | None] = [None] * n
    errors: list[BaseException | None] = [None] * n

    finished = [threading.Event() for _ in range(n)]

    def work(i: int) -> None:
        try:
            results[i] = agents[i].run(question, messages=messages, resume=states[i], meta=meta)
        except BaseException as e:  # noqa: B036 - re-raised in the caller's thread
            errors[i] = e
        finally:
            finished[i].set()

    # daemon threads: Ctrl-C must not wait for a trajectory stuck in a long model call. Waited for with events,
    # not join(): a Ctrl-C that interrupts Thread.join() on Python 3.11 marks the live thread as stopped
    for i in range(n):
        threading.Thread(target=work, args=(i,), daemon=True, name=f"moonlet-heavy-{i}").start()
    try:
        for f in finished:
            while not f.wait(0.1):
                pass
    except KeyboardInterrupt:  # each trajectory stops at its next step and records "interrupted"; one stuck
        for a in agents:        # in a long model or tool call is left to die with the process (resume redoes it)
            a.cancel.set()
        deadline = time.monotonic() + INTERRUPT_GRACE_S
        for f in finished:
            f.wait(max(0.0, deadline - time.monotonic()))
        raise
    for e in errors:
        if e is not None:
            raise e
    done: list[Result] = [r for r in results if r is not None]
    usage = empty_usage()
    for r in done:
        for k in USAGE_KEYS:
            usage[k] += r.usage[k]
    failed = [r for r in done if r.stop_reason == "error"]
    if failed and len(failed) == len(done):  # nothing to aggregate; no record, so a resume retries them all
        return HeavyResult("", "error", done, usage, time.monotonic() - t0, None,
                           f"every trajectory ended on an error, the first: {failed[0].error}")
    answers = [r.answer for r in done]
    turn, method, answer, error = None, "vote", "", None
    try:
        turn = backend.complete(aggregation_messages(question, done), None, max_tokens=max_tokens,
                                max_thinking_tokens=max_thinking_tokens, temperature=temperature)
        for k in USAGE_KEYS:
            usage[k] += int(turn.usage.get(k, 0) or 0)
        if turn.content.strip() and turn.finish_reason != "error":
            method, answer = "aggregate", turn.content.strip()
        else:
            error = f"the aggregation call returned no answer (finish_reason {turn.finish_reason!r})"
    except Exception as e:  # an aggregation failure must not lose N finished trajectories
        error = f"{type(e).__name__}: {e}"
    if method == "vote":  # over the trajectories that answered: a budget-ended one's last words are no answer
        finished = [r.answer for r in done if r.stop_reason == "answer" and r.answer]
        answer = majority_vote(finished or answers)
    rec = {"type": "aggregate", "answer": answer, "method": method, "answers": answers, "usage": usage,
           "reasoning_content": turn.reasoning_content if turn else "", "error": error}
    if trace is not None:
        trace.write(rec)
    if on_record is not None:
        on_record(rec)
    return HeavyResult(answer, method, done, usage, time.monotonic() - t0, turn, error)
