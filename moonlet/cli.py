"""The `moonlet` command. Each subcommand lives in the module that owns the concept and is imported only
when it runs, so `moonlet --help` stays fast and optional dependencies stay optional."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

# name -> ("module:function", help). The function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("moonlet.costs:cli_info", "parameters, active parameters, sizes, KV bytes and FLOPs of a model"),
    "bench": ("moonlet.bench:cli_bench", "benchmarks against peers, JSON out (bench --help lists them)"),
    "generate": ("moonlet.generate:cli_generate", "generate from a prompt, streaming (--chat: K2 format, reasoning apart)"),
    "tokenizer": ("moonlet.tokenizer:cli_tokenizer", "train a K2-format BPE tokenizer (train), or inspect one (info)"),
    "index": ("moonlet.agent.search:cli_index", "build the SQLite FTS5 (BM25) index for the agent's search/open tools"),
    "serve": ("moonlet.server:cli_serve", "OpenAI-compatible server (reasoning, tool calls, SSE) and web chat UI"),
    "agent": ("moonlet.agent.cli:cli_agent", "thinking agent: reason, call tools, answer (live view, trace, --resume)"),
    "eval": ("moonlet.agent.cli:cli_eval", "run an agentic task suite: accuracy, steps, tokens, time (--sweep plots)"),
    "trace": ("moonlet.agent.trace:cli_trace", "inspect agent traces (trace show TRACE)"),
    "data": ("moonlet.data:cli_data", "tokenize a text corpus or SFT JSONL into memory-mapped shards (cached)"),
    "train": ("moonlet.train:cli_train", "pretrain / SFT with MuonClip: resume, checkpoints, metrics, data parallel"),
    "plot": ("moonlet.train_reports:cli_plot", "PNGs of loss, max attention logit and expert load of a run, or several runs compared"),
    "experiment": ("moonlet.train_reports:cli_experiment", "reproduce a K2 result at small scale (experiment muonclip|int4)"),
    "quantize": ("moonlet.quant:cli_quantize", "RTN INT4 of the routed experts into K2 Thinking's compressed-tensors format"),
}


# argparse types for the subcommands' numeric options


def at_least(lo: int, hi: int | None = None):
    """argparse type: an int >= lo (and <= hi if given); bad values are usage errors that name the option."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}" if v < lo else f"must be <= {hi}, got {v}")
        return v
    return parse


def number_in(lo: float, hi: float | None = None, open_lo: bool = False):
    """argparse type: a finite float in [lo, hi] (or (lo, hi] with open_lo)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (open_lo and v == lo) or (hi is not None and v > hi):
            want = f"{'>' if open_lo else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {want}, got {text}")
        return v
    return parse


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: moonlet <command> [options]   (moonlet <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from moonlet import __version__

        print(f"moonlet {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"moonlet: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except KeyboardInterrupt:
        print(f"moonlet {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moonlet info kimi-k2 | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit flush would fail again)
        return 141
    except Exception as e:
        if os.environ.get("MOONLET_DEBUG") == "1" or not isinstance(e, user_errors()):
            raise
        print(f"moonlet {name}: {e}", file=sys.stderr)  # bad input: the message says what to fix
        return 1


class UsageError(ValueError):
    """Options that parse but do not fit together, or name something that is not there, found once the command
    has started (after a model loaded, say): one line "moonlet CMD: ..." and exit 1, as argparse would say it."""


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input (a wrong path, config, checkpoint, tokenizer, dataset): one line on
    stderr and exit 1, no traceback (MOONLET_DEBUG=1 shows it). Anything else is a bug and keeps its traceback."""
    # UsageError by import, not this module's global: under `python -m moonlet.cli` that is __main__'s copy, and
    # the commands raise moonlet.cli's
    from moonlet.checkpoint import CheckpointError
    from moonlet.cli import UsageError
    from moonlet.config import ConfigError
    from moonlet.data import DataError
    from moonlet.quant import QuantError
    from moonlet.tokenizer import TokenizerError

    return (UsageError, CheckpointError, ConfigError, DataError, QuantError, TokenizerError, FileNotFoundError,
            NotADirectoryError, IsADirectoryError, PermissionError)


if __name__ == "__main__":
    sys.exit(main())
