"""JSONL traces: every step of a run appended and fsynced as it happens, so `kill -9` loses at most the
record being written, and `replay` rebuilds the conversation to resume from.

Records (one JSON object a line; heavy-mode trajectories add "traj": i):
  start   {"messages", "tools", "meta"}                     the initial conversation and how the run was set up
  turn    {"step", "message", "usage", "finish_reason", "elapsed"}   one assistant message
  tool    {"step", "tool_call_id", "name", "content", "error", "seconds"}   one finished tool call
  hide    {"ids"}                                           tool outputs hidden by context management
  end     {"stop_reason", "answer", "steps", "usage", "cost", "elapsed"}
  aggregate {"answer", "method", "answers"}                 heavy mode's final answer
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from moonlet.agent.backends import USAGE_KEYS, empty_usage


class Trace:
    """Append-only JSONL writer; thread-safe (parallel tools, heavy trajectories); each record is flushed and
    fsynced before write() returns. Opening an existing trace drops a torn last line left by a crash."""

    def __init__(self, path: str | Path, *, fsync: bool = True):
        self.path, self.fsync = Path(path), fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._f = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
            if self.fsync:
                os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            self._f.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_trace(path: str | Path) -> list[dict]:
    """All complete records; a torn last line (the process died mid-write) is ignored, a bad line elsewhere
    is an error naming the line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace {path} does not exist")
    lines = path.read_bytes().split(b"\n")  # bytes: a torn last line may end inside a UTF-8 character
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == len(lines) - 1:  # no newline after it: torn by a crash
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({e})") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict) or not isinstance(r.get("type"), str)),
               None)
    if bad is not None:
        raise ValueError(f"{path}: record {bad + 1} is not a trace record (an object with a 'type')")
    if not records or records[0].get("type") != "start":
        raise ValueError(f"{path}: a trace starts with a 'start' record")
    return records


@dataclass
class Replay:
    """A run rebuilt from its trace: the conversation so far (tool results in call order), counters, and the
    end record if it finished. Calls of the last turn without a result are still to run."""

    messages: list[dict]
    tools: list[dict]
    meta: dict
    steps: int = 0
    usage: dict = field(default_factory=empty_usage)
    elapsed: float = 0.0
    hidden: set[str] = field(default_factory=set)
    end: dict | None = None


def replay(records: list[dict], traj: int | None = None) -> Replay:
    recs = [r for r in records if r.get("traj") == traj]
    if not recs or recs[0]["type"] != "start":
        raise ValueError(f"the trace has no start record for trajectory {traj}")
    start = recs[0]
    rep = Replay([dict(m) for m in start["messages"]], start.get("tools") or [], start.get("meta") or {})
    results: dict[str, dict] = {}
    for r in recs[1:]:
        if r["type"] == "turn":
            rep.messages.append(r["message"])
            rep.steps = r["step"]
            rep.elapsed = r.get("elapsed", rep.elapsed)
            for k in USAGE_KEYS:
                rep.usage[k] += r.get("usage", {}).get(k, 0)
            calls = r["message"].get("tool_calls") or []
            results = {}
            # results of this turn arrive next, in completion order; messages keep call order
            rep.messages += [{"_pending": c["id"]} for c in calls]
        elif r["type"] == "tool":
            results[r["tool_call_id"]] = {"role": "tool", "tool_call_id": r["tool_call_id"],
                                          "content": r["content"]}
            for i, m in enumerate(rep.messages):
                if m.get("_pending") == r["tool_call_id"]:
                    rep.messages[i] = results[r["tool_call_id"]]
            rep.elapsed = r.get("elapsed", rep.elapsed)
        elif r["type"] == "hide":
            rep.hidden.update(r["ids"])
        elif r["type"] == "end":
            rep.end = r
    rep.messages = [m for m in rep.messages if "_pending" not in m]
    return rep


def summarize(records: list[dict], traj: int | None = None) -> dict:
    """The numbers of one run (or one heavy-mode trajectory) in a trace: `moonlet trace show --json`."""
    rep = replay(records, traj)
    recs = [r for r in records if r.get("traj") == traj]
    end = rep.end or {}
    return {"traj": traj, "finished": rep.end is not None, "stop_reason": end.get("stop_reason"),
            "answer": end.get("answer"), "steps": rep.steps,
            "tool_calls": sum(len(r["message"].get("tool_calls") or []) for r in recs if r["type"] == "turn"),
            "tool_errors": sum(1 for r in recs if r["type"] == "tool" and r.get("error")),
            "hidden_tool_outputs": len(rep.hidden), "usage": rep.usage, "cost": end.get("cost"),
            "elapsed_s": rep.elapsed}


def summarize_trace(records: list[dict], traj: int | None = None) -> dict:
    """A plain run's summary; for a heavy-mode trace (unless one --traj is asked for) the aggregated answer,
    how it was reached, and each trajectory's summary."""
    trajs = sorted({r["traj"] for r in records if r["type"] == "start" and r.get("traj") is not None})
    if traj is not None or not trajs:
        return summarize(records, traj)
    agg = next((r for r in records if r["type"] == "aggregate"), None)
    per = [summarize(records, i) for i in trajs]
    usage = (agg or {}).get("usage") or {k: sum(t["usage"][k] for t in per) for k in per[0]["usage"]}
    return {"heavy": len(trajs), "finished": agg is not None, "answer": (agg or {}).get("answer"),
            "method": (agg or {}).get("method"), "usage": usage, "trajectories": per}


# ----------------------------------------------------------------------------------------------- printing

class Printer:
    """Renders records for a terminal: the live view of `moonlet agent` and `moonlet trace show` share it."""

    def __init__(self, out: TextIO | None = None, *, max_lines: int = 12, color: bool | None = None,
                 show_reasoning: bool = True):
        self.out = out or sys.stdout
        self.max_lines, self.show_reasoning = max_lines, show_reasoning
        self.color = self.out.isatty() if color is None else color
        self._streaming: str | None = None  # the field being streamed by delta(), if any

    def delta(self, d: dict) -> None:
        """A streamed piece of the turn being generated (Agent(on_delta=printer.delta))."""
        field = "reasoning_content" if d.get("reasoning_content") else "content"
        if field == "reasoning_content" and not self.show_reasoning:
            return
        if self._streaming is not None and self._streaming != field:
            self.out.write("\n")
        self._streaming = field
        self.out.write(self._c("2;3", d[field]) if field == "reasoning_content" else d[field])
        self.out.flush()

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def _clip(self, text: str) -> str:
        lines = text.splitlines() or [""]
        if self.max_lines and len(lines) > self.max_lines:
            lines = lines[: self.max_lines] + [f"... ({len(lines) - self.max_lines} more lines)"]
        return "\n".join(lines)

    def __call__(self, r: dict) -> None:
        p = lambda s="": print(s, file=self.out, flush=True)
        tag = f"[traj {r['traj']}] " if r.get("traj") is not None else ""
        kind = r.get("type")
        if kind == "start":
            meta = r.get("meta") or {}
            p(self._c("1", f"{tag}question: ") + str(meta.get("question") or r["messages"][-1].get("content")))
            if r.get("tools"):
                p(self._c("2", "tools: " + ", ".join(t["function"]["name"] for t in r["tools"])))
        elif kind == "turn":
            m, u = r["message"], r.get("usage", {})
            streamed, self._streaming = self._streaming is not None, None
            if streamed:
                p()
            p(self._c("2", f"{tag}── step {r['step']}  ({u.get('prompt_tokens', 0)} in, "
                           f"{u.get('cached_tokens', 0)} cached, {u.get('completion_tokens', 0)} out) ──"))
            if self.show_reasoning and m.get("reasoning_content") and not streamed:
                p(self._c("2;3", self._clip(m["reasoning_content"])))
            if m.get("content") and not streamed:
                p(m["content"] if m.get("tool_calls") else self._c("1", m["content"]))
            for c in m.get("tool_calls") or []:
                p(self._c("36", f"→ {c['function']['name']}({c['function']['arguments']})  [{c['id']}]"))
        elif kind == "tool":
            color = "31" if r.get("error") else "32"
            p(self._c(color, f"{tag}← {r['tool_call_id']} ({r.get('seconds', 0):.2f}s)"))
            p(self._clip(r["content"]))
        elif kind == "hide":
            p(self._c("33", f"{tag}[context: hid {len(r['ids'])} earlier tool outputs]"))
        elif kind == "end":
            u = r.get("usage", {})
            p(self._c("1", f"{tag}== {r['stop_reason']} after {r['steps']} steps, "
                           f"{u.get('prompt_tokens', 0)} prompt / {u.get('completion_tokens', 0)} completion "
                           f"tokens, ${r.get('cost', 0):.4f}, {r.get('elapsed', 0):.1f}s =="))
            if r.get("error"):
                p(self._c("31", f"error: {r['error']}"))
            if r.get("answer") and r.get("traj") is None:
                p(self._c("1", "answer: ") + r["answer"])
        elif kind == "aggregate":
            p(self._c("1", f"== heavy ({r.get('method')}) answer: ") + str(r.get("answer")))


def cli_trace(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="moonlet trace", description="Inspect agent traces (JSONL written by "
                                 "`moonlet agent --trace`).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print a trace readably: reasoning, tool calls, results, budgets")
    show.add_argument("trace", help="path to a .jsonl trace")
    show.add_argument("--full", action="store_true", help="do not clip long reasoning and tool outputs")
    show.add_argument("--no-reasoning", action="store_true", help="hide reasoning text")
    show.add_argument("--traj", type=int, default=None, help="heavy mode: only this trajectory")
    show.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                      help="ANSI colors (default: when stdout is a terminal)")
    show.add_argument("--json", action="store_true", help="print only a JSON summary (steps, tool calls and "
                      "errors, tokens, cost, answer; per trajectory in heavy mode) as one object")
    args = ap.parse_args(argv)
    try:
        records = read_trace(args.trace)
        if args.json:
            print(json.dumps({"trace": str(args.trace), **summarize_trace(records, args.traj)}))
            return 0
    except (OSError, ValueError) as e:
        print(f"moonlet trace: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError) as e:  # a hand-edited or foreign record
        print(f"moonlet trace: {args.trace}: a malformed record ({type(e).__name__} {e}); `moonlet trace show` "
              "without --json shows the records it can read", file=sys.stderr)
        return 2
    printer = Printer(max_lines=0 if args.full else 12, color=args.color, show_reasoning=not args.no_reasoning)
    for i, r in enumerate(records, 1):
        if args.traj is None or r.get("traj") == args.traj:
            try:
                printer(r)
            except (KeyError, TypeError, AttributeError) as e:  # a hand-edited or foreign record
                print(f"(record {i}: a malformed {r['type']!r} record, shown raw: {type(e).__name__} {e})\n"
                      f"{json.dumps(r)[:500]}")
    if records[-1]["type"] not in ("end", "aggregate"):
        print("(trace ends without an 'end' record: the run was interrupted; `moonlet agent --resume "
              f"{args.trace}` continues it)")
    return 0
