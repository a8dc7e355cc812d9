"""`moonlet agent` and `moonlet eval`: the agent loop from the command line.

    moonlet agent "question" --model tiny                      local engine (a preset or an HF directory)
    moonlet agent "question" --base-url http://host:8000/v1    any OpenAI-compatible endpoint
    moonlet agent --resume runs/agent/20261122-120000-4242.jsonl continue a killed or interrupted run
    moonlet eval arith --model X --n 100 --json                accuracy, steps, tokens, wall time
    moonlet eval lookup --base-url URL --sweep                 test-time scaling curves as a PNG
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from moonlet.agent.backends import ScriptedBackend, empty_usage
from moonlet.agent.context import token_counter
from moonlet.agent.loop import Agent, Budget
from moonlet.cli import UsageError, at_least, number_in

K2_CONTEXT = 262144


# --------------------------------------------------------------------------------------------- arguments

def add_backend_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model (pick one)")
    g.add_argument("--model", help="local: a preset name (tiny, nano, ...) or an HF checkpoint directory; with "
                   "--base-url: the served model's name (default: the server's first model)")
    g.add_argument("--base-url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--api-key", default=None, help="API key (default: $OPENAI_API_KEY, else 'EMPTY')")
    g.add_argument("--scripted", metavar="FILE", help="TESTING AID: replay the turns in FILE (JSON list of "
                   "assistant turns) instead of a model; proves the loop, not a model")
    g.add_argument("--tokenizer", default=None, help="local: tokenizer directory (default: moonlet's)")
    g.add_argument("--device", default=None, help="local: torch device (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="local: weight dtype (default: bfloat16 on cuda, float32 on cpu)")
    b = ap.add_argument_group("budgets")
    b.add_argument("--max-steps", type=at_least(1), default=300, help="model calls per trajectory (default: 300)")
    b.add_argument("--max-tokens", type=at_least(1), default=None, help="completion tokens per step, reasoning included "
                   "(default: 16384, at most half the context)")
    b.add_argument("--max-thinking-tokens", type=at_least(0), default=None, help="reasoning tokens per step")
    b.add_argument("--max-total-tokens", type=at_least(1), default=None, help="prompt + completion tokens, all steps")
    b.add_argument("--max-time", type=number_in(0, open_lo=True), default=None, help="wall-clock seconds")
    b.add_argument("--max-cost", type=number_in(0, open_lo=True), default=None, help="dollars, from --price-*")
    b.add_argument("--price-input", type=number_in(0), default=0.0, help="$ per million input tokens (K2: 0.60)")
    b.add_argument("--price-output", type=number_in(0), default=0.0, help="$ per million output tokens (K2: 2.50)")
    b.add_argument("--price-cached", type=number_in(0), default=None, help="$ per million cached input tokens")
    b.add_argument("--context-limit", type=at_least(1), default=None, help="context length in tokens; older tool "
                   "outputs are hidden to stay under it (default: the model's; for endpoints their max_model_len, else 262144)")
    ap.add_argument("--tools", default="calculator,python", help="comma list: calculator, python, search "
                    "(needs --docs), or module:attr for your own (default: calculator,python)")
    ap.add_argument("--docs", default=None, help="directory (or index built by `moonlet index`) for search/open")
    ap.add_argument("--temperature", type=number_in(0), default=1.0, help="sampling temperature (K2: 1.0)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed")
    ap.add_argument("--heavy", type=at_least(1), default=1, metavar="N", help="heavy mode: N parallel trajectories + "
                    "one aggregation call")
    ap.add_argument("--repeat-limit", type=at_least(1), default=3, help="identical calls allowed before refusing")


def budget_from(args: argparse.Namespace) -> Budget:
    return Budget(max_steps=args.max_steps, max_tokens_per_step=args.max_tokens,
                  max_thinking_tokens=args.max_thinking_tokens, max_total_tokens=args.max_total_tokens,
                  max_wall_s=args.max_time, max_cost=args.max_cost, price_input=args.price_input,
                  price_output=args.price_output, price_cached=args.price_cached)


def make_backend(args: argparse.Namespace) -> tuple[Any, int | None]:
    """(backend, default context limit: the engine's, the endpoint's model card's, else K2's) from --scripted /
    --base-url / --model."""
    if sum(x is not None for x in (args.scripted, args.base_url)) > 1:
        raise UsageError("give only one of --scripted, --base-url")
    if args.scripted:
        try:
            return ScriptedBackend.from_file(args.scripted), None
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise UsageError(f"--scripted {args.scripted}: {e}") from None
    if args.base_url:
        from moonlet.agent.backends import OpenAIBackend

        key = args.api_key or os.environ.get("OPENAI_API_KEY")
        try:
            backend = OpenAIBackend(args.base_url, key, args.model)
        except ConnectionError as e:
            raise UsageError(str(e)) from None
        return backend, backend.context_length or K2_CONTEXT
    if not args.model:
        raise UsageError("give --model (local) or --base-url (an endpoint)")
    import torch

    import moonlet
    from moonlet.agent.backends import LocalBackend
    from moonlet.checkpoint import default_dtype
    from moonlet.engine import Engine
    from moonlet.tokenizer import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device) if args.dtype is None else getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"--dtype {args.dtype!r} is not a torch dtype")
    model = moonlet.load(args.model, device=device, dtype=dtype)
    tok = load_tokenizer(args.tokenizer)
    engine = Engine(model, tok, device=device)
    engine.start()
    return LocalBackend(engine, tok), engine.max_seq_len


def resolve_limits(args: argparse.Namespace, model_ctx: int | None) -> None:
    """Fill --context-limit and --max-tokens from the model when not given, and check they fit together."""
    args.context_limit = args.context_limit or model_ctx
    if args.max_tokens is None:
        args.max_tokens = min(16384, args.context_limit // 2) if args.context_limit else 16384
    if args.context_limit is not None and args.max_tokens >= args.context_limit:
        raise UsageError(f"--max-tokens {args.max_tokens} leaves no room for a prompt in a context of "
                         f"{args.context_limit} tokens (--context-limit)")


def make_tools(spec: str, docs: str | None = None) -> list:
    """--tools parsing: built-in names, or module:attr (a Tool, a list of Tools, or a typed function that
    the @tool decorator wraps)."""
    from moonlet.agent import tools as T

    out: list = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if ":" in name:
            mod, attr = name.split(":", 1)
            try:
                obj = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:
                raise UsageError(f"--tools {name}: {e}") from None
            if isinstance(obj, list | tuple):
                out += list(obj)
            else:
                out.append(obj if hasattr(obj, "spec") else T.tool(obj))
        elif name == "calculator":
            out.append(T.calculator)
        elif name == "python":
            from moonlet.agent.sandbox import python_tool

            out.append(python_tool())
        elif name in ("search", "open"):
            if not docs:
                raise UsageError(f"--tools {name} needs --docs DIR (a directory or a `moonlet index`)")
            if not any(t.name == "search" for t in out):
                from moonlet.agent.search import build_index, search_tools

                index = Path(docs)
                if index.is_dir():  # a collection: index it once, next to it
                    index = index.parent / f"{index.name}.index.sqlite"
                    if not index.exists():
                        build_index(docs, index)
                elif not index.exists():
                    raise UsageError(f"--docs {docs}: no such directory or index")
                out += search_tools(index)
        else:
            raise UsageError(f"--tools: unknown tool {name!r}; built-ins are calculator, python, "
                             "search, open; or give module:attr")
    return out


def terminal_approver(lock: threading.Lock | None = None):
    """Ask on the terminal: y approves, n rejects, anything else rejects and is sent to the model."""
    lock = lock or threading.Lock()

    def approve(call: dict, tool: Any) -> bool | str:
        if not sys.stdin.isatty():
            return "not approved: no terminal to ask on (pass --yes to approve every call)"
        with lock:
            fn = call["function"]
            print(f"\n\033[33mapprove {fn['name']}({fn['arguments']})?\033[0m [y]es / [n]o / or type feedback: ",
                  end="", file=sys.stderr, flush=True)
            reply = sys.stdin.readline().strip()
        if reply.lower() in ("y", "yes"):
            return True
        return False if reply.lower() in ("", "n", "no") else reply

    return approve


# ------------------------------------------------------------------------------------------------- agent

def agent_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="moonlet agent", description="Run the thinking agent: the model reasons, calls tools, reads the "
        "results, and repeats until it answers or a budget ends. Shows reasoning, calls and results live and "
        "appends every step to a JSONL trace (fsynced), so a killed run resumes with --resume.")
    ap.add_argument("question", nargs="?", help="the task (omit with --resume)")
    add_backend_args(ap)
    ap.add_argument("--system", default=None, help="system prompt (default: K2's)")
    ap.add_argument("--yes", action="store_true", help="approve every tool call that needs approval")
    ap.add_argument("--trace", default=None, help="trace path (default: runs/agent/<time>-<pid>.jsonl); a trace "
                    "that holds a run is continued only with --resume")
    ap.add_argument("--resume", metavar="TRACE", help="continue the run in TRACE; finished tool calls are not "
                    "re-run; flags given now override the recorded ones")
    ap.add_argument("--quiet", action="store_true", help="no live view; print only the answer")
    ap.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")
    return ap


def explicit_args(ap: argparse.ArgumentParser, argv: list[str]) -> dict:
    """Only the options typed on this command line (defaults suppressed)."""
    for a in ap._actions:
        a.default = argparse.SUPPRESS
    return vars(ap.parse_args(argv))


def cli_agent(argv: list[str]) -> int:
    ap = agent_parser()
    args = ap.parse_args(argv)
    records = None
    from moonlet.agent.trace import Printer, Trace, read_trace, replay

    if args.resume:
        try:
            records = read_trace(args.resume)
        except (OSError, ValueError) as e:
            raise UsageError(f"--resume: {e}") from None
        stored = records[0].get("meta", {}).get("cli", {})
        explicit = explicit_args(agent_parser(), argv)
        if "heavy" in explicit and explicit["heavy"] != stored.get("heavy", 1):
            raise UsageError(f"--resume: the trace ran --heavy {stored.get('heavy', 1)}; a resume "
                             "continues those trajectories (drop --heavy, or start a new run)")
        args = argparse.Namespace(**(vars(args) | stored | explicit))
        args.trace = args.resume
        try:  # a hand-edited or foreign trace: say so here, not as a traceback mid-run
            for traj in sorted({r.get("traj") for r in records if r.get("type") == "start"}, key=str):
                replay(records, traj)
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"--resume {args.resume}: not a trace moonlet can continue ({e!r})") from None
    elif not args.question:
        ap.error("give a question (or --resume TRACE)")
    cli_meta = {k: v for k, v in vars(args).items() if k not in ("resume", "trace", "json", "quiet", "yes")}

    backend, model_ctx = make_backend(args)
    resolve_limits(args, model_ctx)
    tools = make_tools(args.tools, args.docs)
    trace_path = Path(args.trace or f"runs/agent/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl")
    if not args.resume and trace_path.exists() and trace_path.stat().st_size:
        raise UsageError(f"--trace {trace_path} already holds a run: continue it with --resume "
                         f"{trace_path}, or give another path")
    trace = Trace(trace_path)
    printer = None if args.quiet else Printer(sys.stdout)
    approve = (lambda call, tool: True) if args.yes else terminal_approver()
    if not args.quiet:
        print(f"trace: {trace_path}", flush=True)

    count = getattr(backend, "count_tokens", None) or token_counter()
    stream = printer.delta if printer is not None and args.heavy <= 1 else None  # N streams would interleave

    def make_agent(i: int = 0) -> Agent:
        seed = None if args.seed is None else args.seed + i
        return Agent(backend, tools, budget=budget_from(args), context_limit=args.context_limit,
                     count_tokens=count, system=args.system, approve=approve, repeat_limit=args.repeat_limit,
                     temperature=args.temperature, seed=seed, trace=trace, on_record=printer, on_delta=stream)

    meta = {"question": args.question, "cli": cli_meta}
    t0 = time.monotonic()
    try:
        if args.heavy > 1:
            from moonlet.agent.heavy import run_heavy

            h = run_heavy(make_agent, backend, args.question, args.heavy, trace=trace, resume=records,
                          max_tokens=args.max_tokens, max_thinking_tokens=args.max_thinking_tokens,
                          temperature=args.temperature, on_record=printer, meta=meta)
            answer, stop, steps, usage, error = h.answer, h.method, h.steps, h.usage, h.error
            cost = budget_from(args).cost(usage)
        else:
            agent = make_agent()
            r = agent.run(args.question, resume=replay(records) if records else None, meta=meta)
            answer, stop, steps, usage, cost, error = r.answer, r.stop_reason, r.steps, r.usage, r.cost, r.error
        if stop == "error":
            print(f"moonlet agent: stopped on an error: {error}\n(resume with: moonlet agent --resume "
                  f"{trace_path})", file=sys.stderr)
        elif stop == "context_full":
            print(f"moonlet agent: stopped, the context is full: {error}", file=sys.stderr)
        elif stop == "empty":
            print("moonlet agent: the model ended its turn with no answer and no tool call", file=sys.stderr)
    except KeyboardInterrupt:  # heavy mode: trajectories record their own ends
        answer, stop, steps, usage, cost = "", "interrupted", 0, empty_usage(), 0.0
    finally:
        trace.close()
    if stop == "interrupted":
        print(f"\ninterrupted; the trace is saved: moonlet agent --resume {trace_path}", file=sys.stderr)
    elif args.quiet:
        print(answer)
    if args.json:
        print(json.dumps({"answer": answer, "stop_reason": stop, "steps": steps, "usage": usage,
                          "cost": cost, "wall_s": round(time.monotonic() - t0, 3), "trace": str(trace_path)}))
    return 130 if stop == "interrupted" else 1 if stop in ("error", "context_full") else 0



# -------------------------------------------------------------------------------------------------- eval

SWEEP_DEFAULT = "steps=1,2,4,8,16,32;thinking=256,1024,4096,16384;heavy=1,2,4,8"
SWEEP_DIALS = {"steps": "max steps", "thinking": "reasoning tokens per step", "heavy": "heavy N"}


def evaluate(tasks: list, backend: Any, *, budget: Budget, heavy: int = 1, concurrency: int = 4,
             context_limit: int | None = None, temperature: float = 1.0, seed: int | None = None,
             approve: Any = None, metrics: Path | None = None, progress: bool = True, label: str = "eval",
             tools_for: Any = None) -> dict:
    """Run every task (threads share the backend, so a local engine batches them), grade the answers and
    summarize: accuracy, steps, tool calls, tokens, cost, wall time. One JSONL row per task to `metrics`."""
    from concurrent.futures import ThreadPoolExecutor

    from moonlet.tasks import grade, task_tools

    tools_for = tools_for or task_tools
    count = (getattr(backend, "count_tokens", None) or token_counter()) if context_limit else None
    approve = approve or (lambda call, tool: True)
    lock = threading.Lock()
    rows: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc=label, file=sys.stderr, leave=False)

    def one(task) -> None:
        tools = tools_for(task)
        mk = lambda i: Agent(backend, tools, budget=budget, context_limit=context_limit, count_tokens=count,
                             temperature=temperature, seed=None if seed is None else seed + i, approve=approve)
        t0 = time.monotonic()
        if heavy > 1:
            from moonlet.agent.heavy import run_heavy

            h = run_heavy(mk, backend, task.question, heavy, max_tokens=budget.max_tokens_per_step,
                          max_thinking_tokens=budget.max_thinking_tokens, temperature=temperature)
            answer, stop, steps, usage = h.answer, h.method, h.steps, h.usage
            calls = sum(r.tool_calls for r in h.results)
            error = next((r.error for r in h.results if r.error), None)
        else:
            r = mk(0).run(task.question)
            answer, stop, steps, usage, calls, error = r.answer, r.stop_reason, r.steps, r.usage, r.tool_calls, r.error
        row = {"run": label, "id": task.id, "correct": bool(grade(task, answer)), "stop_reason": stop, "steps": steps,
               "tool_calls": calls, **usage, "cost": budget.cost(usage), "wall_s": round(time.monotonic() - t0, 3),
               "answer": answer[-500:], "expected": task.answer, **({"error": error} if error else {})}
        with lock:
            rows.append(row)
            if metrics is not None:
                with open(metrics, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if bar is not None:
                bar.update(1)

    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            list(pool.map(one, tasks))
    finally:
        if bar is not None:
            bar.close()
    n = max(1, len(rows))
    total = {k: sum(r[k] for r in rows) for k in ("prompt_tokens", "cached_tokens", "completion_tokens",
                                                  "reasoning_tokens", "steps", "tool_calls")}
    return {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / n,
            "mean_steps": total["steps"] / n, "mean_tool_calls": total["tool_calls"] / n,
            "tokens": {k: total[k] for k in ("prompt_tokens", "cached_tokens", "completion_tokens",
                                             "reasoning_tokens")},
            "mean_tokens": (total["prompt_tokens"] + total["completion_tokens"]) / n,
            "cost": sum(r["cost"] for r in rows), "wall_s": round(time.monotonic() - t0, 3),
            "mean_task_wall_s": sum(r["wall_s"] for r in rows) / n,
            "stop_reasons": {s: sum(r["stop_reason"] == s for r in rows) for s in sorted({r["stop_reason"] for r in rows})},
            "errors": sum("error" in r for r in rows),
            "first_error": next((r["error"] for r in rows if "error" in r), None)}


def report_errors(summary: dict, label: str) -> None:
    """A server that is down scores 0.000 like a model that is wrong: say which it was."""
    if summary["errors"]:
        print(f"moonlet eval: {label}: {summary['errors']} of {summary['n']} tasks ended on an error, the first: "
              f"{summary['first_error']}", file=sys.stderr)


def parse_sweep(spec: str) -> dict[str, list[int]]:
    out = {}
    for part in [p for p in spec.split(";") if p.strip()]:
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in SWEEP_DIALS:
            raise UsageError(f"--sweep dial {name!r} unknown; choose from {', '.join(SWEEP_DIALS)}")
        try:
            out[name] = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            out[name] = []
        if not out[name] or min(out[name]) < 1:
            raise UsageError(f"--sweep {part!r}: give integers >= 1, e.g. steps=1,4,16")
    if not out:
        raise UsageError(f"--sweep {spec!r} names no dial; e.g. 'steps=1,4,16;heavy=1,2'")
    return out


def plot_sweep(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib  # optional dependency: only for --sweep

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (dial, points) in zip(axes[0], results.items()):
        xs, ys = [p["value"] for p in points], [p["accuracy"] for p in points]
        ax.plot(xs, ys, marker="o")
        if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        else:  # every dial is a count: no 1.5 trajectories or 2.25 steps on the axis
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(SWEEP_DIALS[dial])
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli_eval(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="moonlet eval", description="Run the agent on a generated, verifiable task suite (moonlet.tasks) and "
        "report accuracy, steps, tokens and wall time. --sweep draws test-time scaling curves (accuracy vs max "
        "steps, vs reasoning budget, vs heavy N) as a PNG.")
    ap.add_argument("task", help="task kind: multihop (search/open over a generated collection) or python")
    add_backend_args(ap)
    ap.add_argument("--n", type=at_least(1), default=100, help="number of tasks (default: 100)")
    ap.add_argument("--difficulty", type=int, default=2, help="multihop: lookups needed; python: sizes (default: 2)")
    ap.add_argument("--task-seed", type=int, default=0, help="seed of the task generator (default: 0)")
    ap.add_argument("--workdir", default="runs/tasks", help="where generated collections live (default: runs/tasks)")
    ap.add_argument("--concurrency", type=at_least(1), default=4, help="tasks run at once (default: 4)")
    ap.add_argument("--out", default=None, help="per-task JSONL metrics (default: runs/eval/<task>-<time>.jsonl)")
    ap.add_argument("--sweep", nargs="?", const=SWEEP_DEFAULT, default=None, metavar="SPEC",
                    help=f"dials to sweep, e.g. 'steps=1,4,16;heavy=1,2,4' (default: {SWEEP_DEFAULT})")
    ap.add_argument("--plot", default=None, help="sweep PNG path (default: next to --out)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)

    from moonlet.tasks import make_tasks

    try:
        tasks = make_tasks(args.task, args.n, difficulty=args.difficulty, seed=args.task_seed, workdir=args.workdir)
    except ValueError as e:
        print(f"moonlet eval: {e}", file=sys.stderr)
        return 2
    backend, model_ctx = make_backend(args)
    resolve_limits(args, model_ctx)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/eval/{args.task}-{stamp}.jsonl")
    if out.exists() and out.stat().st_size:  # rows are appended as tasks finish: two runs would mix
        raise UsageError(f"--out {out} already holds results; give another path or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    common = dict(concurrency=args.concurrency, context_limit=args.context_limit,
                  temperature=args.temperature, seed=args.seed, metrics=out, progress=not args.no_progress)
    if not args.sweep:
        summary = {"task": args.task, "difficulty": args.difficulty,
                   **evaluate(tasks, backend, budget=budget_from(args), heavy=args.heavy, **common), "metrics": str(out)}
        report_errors(summary, args.task)
        if not args.json:
            print(f"{args.task} d={args.difficulty}: accuracy {summary['accuracy']:.3f} on {summary['n']} tasks, "
                  f"{summary['mean_steps']:.1f} steps and {summary['mean_tokens']:.0f} tokens a task, "
                  f"{summary['wall_s']:.1f}s")
        else:
            print(json.dumps(summary))
        return 1 if summary["n"] and summary["errors"] == summary["n"] else 0
    curves: dict[str, list[dict]] = {}
    dead = False  # a sweep point where every task ended on an error (a backend down): exit 1, as without --sweep
    for dial, values in parse_sweep(args.sweep).items():
        for v in values:
            b, heavy = budget_from(args), args.heavy
            if dial == "steps":
                b.max_steps = v
            elif dial == "thinking":
                b.max_thinking_tokens = v
            else:
                heavy = v
            s = evaluate(tasks, backend, budget=b, heavy=heavy, label=f"{dial}={v}", **common)
            report_errors(s, f"{dial}={v}")
            dead = dead or bool(s["n"] and s["errors"] == s["n"])
            curves.setdefault(dial, []).append({"value": v, **{k: s[k] for k in ("accuracy", "mean_steps",
                                                                                 "mean_tokens", "wall_s")}})
            if not args.json:
                print(f"{dial}={v}: accuracy {s['accuracy']:.3f}, {s['mean_steps']:.1f} steps, {s['wall_s']:.1f}s")
    plot = Path(args.plot or out.with_suffix(".png"))
    plot_sweep(curves, plot, f"{args.task} (difficulty {args.difficulty}, n={len(tasks)})")
    if args.json:
        print(json.dumps({"task": args.task, "difficulty": args.difficulty, "n": len(tasks), "sweep": curves,
                          "plot": str(plot), "metrics": str(out)}))
    else:
        print(f"plot: {plot}")
    return 1 if dead else 0
