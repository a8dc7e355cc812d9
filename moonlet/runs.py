"""A training run's directory: atomic checkpoints (an HF model directory + train_state.pt with the optimizer,
data position, RNG states and the TrainConfig), the `latest` pointer, the check a resume makes against the
saved config, and metrics.jsonl. The loop that fills it is moonlet.train."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from moonlet.train import TrainConfig


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Path, step: int, model, opt, tc: TrainConfig, data_position: int, keep: int,
                    tokenizer_dir: str | None = None) -> Path:
    """Write checkpoints/step_N.tmp (HF model dir + train_state.pt + the data's tokenizer), rename it, then
    point `latest` at it."""
    from moonlet import checkpoint
    from moonlet.tokenizer import atomic_write, load_tokenizer

    root = run / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checkpoint.save(model, tmp)
    if tokenizer_dir and not (Path(tokenizer_dir) / "tiktoken.model").is_file():
        print(f"moonlet train: the data's tokenizer {tokenizer_dir} is gone; this checkpoint has none (pass "
              "--tokenizer when generating from it)", file=sys.stderr)
    else:  # every checkpoint carries its tokenizer (tokenizer.json too), so vLLM / SGLang / transformers load it
        load_tokenizer(tokenizer_dir).save(tmp)
    state = {"step": step, "data_position": data_position, "optimizer": opt.state_dict(), "rng": rng_state(),
             "train_config": dataclasses.asdict(tc)}
    torch.save(state, tmp / "train_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(root / "latest", final.name + "\n")
    # by step number, and never the one just written (a name sort puts step_10000000 before step_9999999)
    for old in [p for p in _step_dirs(root)[:-keep] if p != final] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_dirs(root: Path) -> list[Path]:
    """checkpoints/step_N directories (not .tmp ones), oldest step first."""
    dirs = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint (train_state.pt is written before the rename), found from the
    directories, not the `latest` pointer: a crash between the rename and the pointer's write leaves the
    pointer missing or one checkpoint behind."""
    complete = [p for p in _step_dirs(run / "checkpoints") if (p / "train_state.pt").is_file()]
    return complete[-1] if complete else None


def load_train_state(ckpt: Path) -> dict:
    # mmap: reading the saved config does not pull the optimizer state into memory
    return torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=False, mmap=True)


def saved_train_config(run: str | Path) -> dict | None:
    """The TrainConfig (as a dict) of the latest checkpoint of a run directory; None without one."""
    ckpt = latest_checkpoint(Path(run))
    return None if ckpt is None else load_train_state(ckpt)["train_config"]


# What a run *is*: a resume that changes one of these cannot continue the run exactly (or at all: another model
# or optimizer does not fit the checkpoint). Everything else is schedule or hyperparameter (steps, stop_at,
# save_every, eval_every, keep, lr, ...), which may change when a run is extended; RUNTIME_FIELDS never matter.
IDENTITY_FIELDS = ("model", "init", "data", "optimizer", "qat", "seq_len", "micro_batch", "grad_accum", "seed",
                   "ns_dtype", "precision")
RUNTIME_FIELDS = ("out", "threads", "progress", "compile", "peak_tflops",
                  "stop_at")  # stop_at belongs to the invocation that stopped: a resume goes on


class ResumeError(ValueError):
    """The options of a resume contradict the run's saved config."""


def _same(name: str, a, b) -> bool:
    if a == b:
        return True
    if name in ("model", "init", "data") and a and b and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


def config_diff(tc: TrainConfig, saved: dict) -> dict[str, tuple]:
    """The fields (not RUNTIME_FIELDS) in which tc differs from a saved TrainConfig: {name: (saved, now)}."""
    now = dataclasses.asdict(tc)
    return {k: (saved.get(k), v) for k, v in now.items() if k not in RUNTIME_FIELDS and not _same(k, saved.get(k), v)}


def resume_changes(tc: TrainConfig, saved: dict, run: Path) -> dict[str, tuple]:
    """Compare a resume's config with the checkpoint's: raise ResumeError naming every identity field that
    differs; return the other changed fields, {name: (saved, now)}."""
    diff = {k: v for k, v in config_diff(tc, saved).items() if k in saved}
    bad = {k: v for k, v in diff.items() if k in IDENTITY_FIELDS}
    if bad:
        lines = "".join(f"\n  --{k.replace('_', '-')}: saved {a!r}, given {b!r}" for k, (a, b) in bad.items())
        raise ResumeError(f"{run} holds a run with other settings, so it cannot resume exactly:{lines}\n"
                          f"Resume with the saved values (options left out are taken from the checkpoint), or "
                          f"start a new run with another --out.")
    return diff


def read_metrics_file(path: Path) -> list[dict]:
    """metrics.jsonl records; a torn last line (a crash mid-write) is dropped with a warning."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    recs = []
    for n, ln in enumerate(lines, 1):
        try:
            recs.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise ValueError(f"{path}:{n}: not a JSON record ({e})") from e
            print(f"moonlet: {path}: dropping a torn last line ({ln[:40]!r}...)", file=sys.stderr)
    return recs
