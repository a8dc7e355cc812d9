"""Looking at training runs: `moonlet plot RUN_DIR...` (loss, max attention logit per layer, expert load;
several runs compared) and `moonlet experiment muonclip|int4` (K2's MuonClip and INT4 QAT results at small
scale). The training loop itself is moonlet.train; timing its step against HF's is moonlet.train_bench."""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from moonlet.config import ModelConfig
from moonlet.runs import config_diff, read_metrics_file, saved_train_config
from moonlet.train import (
    TrainConfig,
    train,
)

# ------------------------------------------------------------------------------------------------------
# moonlet plot


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run} a run directory?)")
    return read_metrics_file(path)


def plot_run(run: str | Path, tau: float | None = None) -> list[Path]:
    """loss.png, max_logits.png (per layer, QK-Clip's tau dashed if given) and expert_load.png (max/mean per
    MoE layer) in the run dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run)
    run, out = Path(run), []
    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in recs], label="train")
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval")
    ax.set(xlabel="step", ylabel="loss", title=f"{run.name}: loss")
    ax.legend()
    out.append(_save(fig, run / "loss.png"))
    for key, name, ylabel in (("max_logit_per_layer", "max_logits.png", "max pre-softmax logit"),
                              ("expert_load_max_over_mean", "expert_load.png", "max / mean expert load")):
        rows = [(r["step"], r[key]) for r in recs if key in r]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for i in range(len(rows[0][1])):
            moe = key.startswith("expert_load")  # one value per MoE layer, not per layer
            ax.plot([s for s, _ in rows], [v[i] for _, v in rows], label=f"{'MoE layer' if moe else 'layer'} {i}")
        if tau is not None and key == "max_logit_per_layer":
            ax.axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
        ax.set(xlabel="step", ylabel=ylabel, title=f"{run.name}: {ylabel}")
        ax.legend(fontsize=7, ncol=2)
        out.append(_save(fig, run / name))
    return out


def _save(fig, path: Path) -> Path:
    """Write and close the figure; a "step" axis gets whole-number ticks (3 steps were labelled 0.25, 0.5, ...)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cli_plot(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="moonlet plot", description="One run: write loss.png, max_logits.png and "
                                 "expert_load.png into RUN_DIR from its metrics.jsonl. Several runs: write "
                                 "compare_loss.png (loss against tokens) and compare_max_logits.png into --out, one "
                                 "line per run. Needs matplotlib.")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of `moonlet train`")
    ap.add_argument("--out", default=".", help="where comparison plots go (several runs; default: %(default)s)")
    ap.add_argument("--tau", type=float, default=None, help="draw the QK-Clip threshold on the max-logit plot")
    args = ap.parse_args(argv)
    try:
        if len(args.runs) == 1:
            paths = plot_run(args.runs[0], tau=args.tau)
        else:
            names = [Path(r).name for r in args.runs]
            labels = names if len(set(names)) == len(names) else args.runs
            paths = plot_comparison(dict(zip(labels, args.runs)), args.out, tau=args.tau)
    except (FileNotFoundError, ValueError) as e:
        print(f"moonlet plot: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


# ------------------------------------------------------------------------------------------------------
# moonlet experiment muonclip

# A small K2-shaped MoE (4 layers: 1 dense + 3 MoE with 8 experts top-2 + 1 shared, MLA without q_lora) that
# trains on two CPU cores in minutes.
EXPERIMENT_MODEL = dict(hidden_size=128, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64, qk_nope_head_dim=32,
                        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2)


def experiment_config(model: dict, data: str | Path) -> ModelConfig:
    """The `nano` preset with an experiment's overrides, sized to the tokenizer of a `moonlet data` directory
    (moonlet tokenizers end with 256 special slots: [BOS] and [EOS] first, [PAD] last)."""
    meta = Path(data) / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{data}: no meta.json; make it with `moonlet data prepare --out {data}`")
    vocab = json.loads(meta.read_text())["vocab_size"]
    return ModelConfig.from_preset("nano").with_(**model, vocab_size=vocab, bos_token_id=vocab - 256,
                                                 eos_token_id=vocab - 255, pad_token_id=vocab - 1)


def experiment_runs(out: Path, data: str, steps: int, lr: float, adamw_lr: float, tau: float, seq_len: int,
                    micro_batch: int, weight_decay: float, seed: int, threads: int | None = 1,
                    progress: bool = True) -> dict[str, TrainConfig]:
    """The experiment's four training configs (same data order and seed), keyed by run name."""
    common = dict(model=str(out / "config.json"), data=data, steps=steps, seq_len=seq_len, micro_batch=micro_batch,
                  warmup=max(1, steps // 20), schedule="constant", weight_decay=weight_decay, seed=seed,
                  ns_dtype="float32", progress=progress, keep=1, threads=threads)
    return {"muon": TrainConfig(out=str(out / "muon"), optimizer="muon", lr=lr, qk_clip_tau=None, **common),
            "muonclip": TrainConfig(out=str(out / "muonclip"), optimizer="muon", lr=lr, qk_clip_tau=tau, **common),
            "adamw": TrainConfig(out=str(out / "adamw"), optimizer="adamw", lr=adamw_lr, qk_clip_tau=None, **common),
            # Moonlight's claim: with RMS-matched updates AdamW's lr carries over, so compare at the same lr
            "muonclip_adamw_lr": TrainConfig(out=str(out / "muonclip_adamw_lr"), optimizer="muon", lr=adamw_lr,
                                             qk_clip_tau=tau, **common)}


def fresh_unless_same(tc: TrainConfig, name: str, force: bool = False) -> bool:
    """Reuse (resume) an earlier sub-run in tc.out only when its saved config is the one built now; otherwise
    delete it so that it retrains (said on stderr). `force`: retrain anyway (its inputs changed). Returns
    whether it was reused."""
    saved = saved_train_config(tc.out)
    if saved is None and not (Path(tc.out) / "metrics.jsonl").exists():
        return False
    diff = {} if saved is None else config_diff(tc, saved)
    if saved is not None and not diff and not force:
        return True
    why = "its inputs changed" if force else "no checkpoint" if saved is None else ", ".join(
        f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
    print(f"moonlet experiment: retraining {name} ({why})", file=sys.stderr)
    shutil.rmtree(tc.out)
    return False


def _model_changed(out: Path, cfg: ModelConfig) -> bool:
    """Whether OUT/config.json (the sub-runs' --model) differs from `cfg`; then writes cfg there."""
    path = out / "config.json"
    changed = path.is_file() and ModelConfig.from_hf(path) != cfg
    cfg.save(out)
    return changed


def muonclip_experiment(out: Path, data: str, steps: int, lr: float, adamw_lr: float, tau: float, seq_len: int,
                        micro_batch: int, weight_decay: float, seed: int, threads: int | None = 1,
                        progress: bool = True) -> tuple[dict, dict[str, list[dict]]]:
    """Four runs on the same data order: vanilla Muon at an aggressive lr (max logits measured, never
    clipped), MuonClip (same lr, QK-Clip at tau), and AdamW vs MuonClip at AdamW's lr (Moonlight's RMS
    matching makes the lr carry over); then comparison plots. Finished runs are reused (resume). Returns the
    summary and each run's metrics records."""
    out.mkdir(parents=True, exist_ok=True)
    model_changed = _model_changed(out, experiment_config(EXPERIMENT_MODEL, data))
    runs = experiment_runs(out, data, steps, lr, adamw_lr, tau, seq_len, micro_batch, weight_decay, seed, threads,
                           progress)
    summary: dict = {"tau": tau, "steps": steps, "tokens": steps * seq_len * micro_batch, "lr_muon": lr,
                     "lr_adamw": adamw_lr, "model": EXPERIMENT_MODEL}
    logs: dict[str, list[dict]] = {}
    for name, tc in runs.items():
        reused = fresh_unless_same(tc, name, force=model_changed)
        done = len(read_metrics(tc.out)) if reused else 0
        t0, c0 = time.perf_counter(), time.process_time()
        train(tc)
        recs = logs[name] = read_metrics(tc.out)
        tail = recs[-max(1, steps // 10):]
        summary[name] = {"final_loss_avg_last10pct": sum(r["loss"] for r in tail) / len(tail),
                         "max_logit_peak": max(r["max_logit"] for r in recs),
                         "max_logit_final": recs[-1]["max_logit"],
                         "heads_clipped_total": sum(r["heads_clipped"] for r in recs),
                         "steps_reused": done,  # finished earlier in OUT: wall_s/cpu_s only cover the rest
                         "wall_s": round(time.perf_counter() - t0, 1),
                         "cpu_s": round(time.process_time() - c0, 1)}
    summary["muon_peak_over_tau"] = summary["muon"]["max_logit_peak"] / tau
    muon, clip = logit_stats(logs["muon"], tau), logit_stats(logs["muonclip"], tau)
    summary["muon"] |= muon
    summary["muonclip"] |= clip
    # the claims as measured here; the clip's on the logged max, which is measured before each step's clip
    peak = clip["after_first_clip_peak_x_tau"]
    summary["claims"] = {"vanilla_reaches_3_tau": muon["first_step_over_3_tau"] is not None,
                         "clip_holds_tau": None if peak is None else peak <= 1.0,  # None: it never clipped
                         "clip_loss_minus_vanilla": (summary["muonclip"]["final_loss_avg_last10pct"]
                                                     - summary["muon"]["final_loss_avg_last10pct"]),
                         "muon_loss_minus_adamw": (summary["muonclip_adamw_lr"]["final_loss_avg_last10pct"]
                                                   - summary["adamw"]["final_loss_avg_last10pct"]),
                         "muon_step_reaching_adamw_final_loss": step_reaching(
                             logs["muonclip_adamw_lr"], summary["adamw"]["final_loss_avg_last10pct"])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plot_comparison({n: out / n for n in runs}, out, prefix="muonclip_", tau=tau)
    except ImportError:
        print("moonlet experiment: matplotlib missing, no plots", file=sys.stderr)
    return summary, logs


def muonclip_seeds(out: Path, seeds: list[int], **kw) -> dict:
    """The MuonClip experiment for each seed (the seed sets both the init and the data order): one seed trains
    in OUT itself, several in OUT/seed{N}, with OUT/summary.json holding every seed's summary and, across
    seeds, each claim's values and the spread (min, mean, max) of the numbers behind it."""
    if len(seeds) == 1:
        return muonclip_experiment(out, seed=seeds[0], **kw)[0]
    per_seed, logs = {}, {}
    for n in seeds:
        per_seed[str(n)], logs[n] = muonclip_experiment(out / f"seed{n}", seed=n, **kw)
    spread = {}
    for where in (("muon_peak_over_tau",), ("muon", "first_step_over_3_tau"),
                  ("muonclip", "after_first_clip_mean_x_tau"), ("muonclip", "after_first_clip_peak_x_tau"),
                  ("muonclip", "after_first_clip_frac_over_tau"), ("claims", "clip_loss_minus_vanilla"),
                  ("claims", "muon_loss_minus_adamw"), ("claims", "muon_step_reaching_adamw_final_loss")):
        values = [functools.reduce(dict.get, where, s) for s in per_seed.values()]
        values = [v for v in values if v is not None]  # None: it never happened in that seed
        spread[".".join(where)] = {"min": min(values), "mean": sum(values) / len(values), "max": max(values),
                                   "seeds": len(values)} if values else None
    claims = {k: [s["claims"][k] for s in per_seed.values()] for k in ("vanilla_reaches_3_tau", "clip_holds_tau")}
    summary = {"seeds": per_seed, "across_seeds": {"claims": claims, "spread": spread}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plot_seed_logits(logs, out, kw["tau"])
    except ImportError:
        print("moonlet experiment: matplotlib missing, no plots", file=sys.stderr)
    return summary


def plot_seed_logits(logs: dict[int, dict[str, list[dict]]], out: Path, tau: float) -> Path:
    """OUT/muonclip_seeds_max_logits.png: every seed's max logit over tau ({seed: {run: metrics records}}),
    vanilla Muon against MuonClip, on a log axis (vanilla's climb spans decades; the clip's band around 1
    would be flat on a linear one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, runs in enumerate(logs.values()):
        for arm, color in (("muon", "tab:blue"), ("muonclip", "tab:orange")):
            rs = runs[arm]
            ax.plot([r["step"] for r in rs], [r["max_logit"] / tau for r in rs], color=color, lw=1, alpha=0.7,
                    label=f"{arm} ({len(logs)} seeds)" if i == 0 else None)
    ax.axhline(1, color="k", ls="--", lw=1, label="tau")
    ax.axhline(3, color="gray", ls=":", lw=1, label="3 tau")
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="max pre-softmax logit / tau", title="max attention logit, one line per seed")
    ax.legend()
    return _save(fig, out / "muonclip_seeds_max_logits.png")


def logit_stats(recs: list[dict], tau: float) -> dict:
    """How a run's logged max logit relates to tau: the first steps above tau and 3 tau, and after the first
    step that clipped (QK-Clip runs) the mean and peak of the later steps' max, in units of tau, and the
    fraction of them above tau. The logged max is measured before the step's clip (see optim.qk_clip)."""
    def over(limit: float) -> int | None:
        return next((r["step"] for r in recs if r["max_logit"] > limit), None)

    first = next((i for i, r in enumerate(recs) if r["heads_clipped"]), None)
    after = [r["max_logit"] / tau for r in recs[first + 1:]] if first is not None else []
    return {"first_step_over_tau": over(tau), "first_step_over_3_tau": over(3 * tau),
            "first_clip_step": None if first is None else recs[first]["step"],
            "after_first_clip_mean_x_tau": sum(after) / len(after) if after else None,
            "after_first_clip_peak_x_tau": max(after) if after else None,
            "after_first_clip_frac_over_tau": sum(a > 1 for a in after) / len(after) if after else None}


def step_reaching(recs: list[dict], goal: float) -> int | None:
    """The first step at which recs' loss, a moving average over a tenth of the run, is at or below `goal`
    (another run's final_loss_avg_last10pct, at equal tokens per step: Muon's token efficiency against AdamW's)."""
    w = max(1, len(recs) // 10)
    losses = [r["loss"] for r in recs]
    return next((recs[i]["step"] for i in range(w - 1, len(losses)) if sum(losses[i - w + 1:i + 1]) / w <= goal),
                None)


def plot_comparison(runs: dict[str, str | Path], out: str | Path, prefix: str = "compare_",
                    tau: float | None = None) -> list[Path]:
    """Several runs on shared axes: {prefix}loss.png (train loss against tokens, lightly smoothed, with each
    run's eval points) and {prefix}max_logits.png (max attention logit over all layers, tau dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recs = {name: read_metrics(run) for name, run in runs.items()}
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rs in recs.items():
        xs, ys = [r["tokens"] / 1e6 for r in rs], [r["loss"] for r in rs]
        k = max(1, len(ys) // 50)  # light smoothing: mean over k steps
        line, = ax.plot(xs[k - 1:], [sum(ys[i - k + 1:i + 1]) / k for i in range(k - 1, len(ys))], label=name)
        ev = [(r["tokens"] / 1e6, r["eval_loss"]) for r in rs if "eval_loss" in r]
        if ev:
            ax.plot(*zip(*ev), "o", color=line.get_color(), ms=4)
    has_eval = any("eval_loss" in r for rs in recs.values() for r in rs)
    ax.set(xlabel="tokens (M)", ylabel="train loss" + (" (dots: eval)" if has_eval else ""), title="loss at equal tokens")
    ax.legend()
    paths.append(_save(fig, out / f"{prefix}loss.png"))
    if all(any("max_logit" in r for r in rs) for rs in recs.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, rs in recs.items():
            ax.plot(*zip(*[(r["step"], r["max_logit"]) for r in rs if "max_logit" in r]), label=name)
        if tau is not None:
            ax.axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
        ax.set(xlabel="step", ylabel="max pre-softmax logit (all layers, heads)", title="max attention logit")
        ax.legend()
        paths.append(_save(fig, out / f"{prefix}max_logits.png"))
    return paths


# The INT4 experiment's model: as in K2, most weights (78 %) are routed experts, the INT4 part; a small vocabulary
# (--vocab-size) keeps the training time in the experts rather than in a 32k-row embedding and head.
INT4_EXPERIMENT_MODEL = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
                             qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=2)


def int4_experiment(out: Path, data: str | None, steps: int, stage_steps: int, stage_lr: float, seeds: list[int],
                    seq_len: int, micro_batch: int, vocab_size: int = 2048, eval_batches: int = 36,
                    threads: int | None = 1, progress: bool = True) -> dict:
    """bf16 vs RTN INT4 vs QAT INT4 of the routed experts at equal tokens, per seed: a bf16 run and a QAT run
    from scratch; then, K2's recipe, a stage from the bf16 run's last step with and without QAT. Every arm is
    evaluated on the val split in full precision and with INT4 experts (RTN; for QAT arms that is exactly the
    grid they trained on). Without --data, a vocab_size BPE and its dataset are built from the Python docs."""
    from moonlet import data as data_mod
    from moonlet.checkpoint import load
    from moonlet.quant import eval_loss, quantize_model
    from moonlet.tokenizer import train_bpe

    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        tok_dir, data = out / f"tokenizer{vocab_size}", str(out / "data")
        if not (tok_dir / "tiktoken.model").is_file():
            train_bpe([data_mod.PYTHON_DOCS], vocab_size).save(tok_dir)
        data_mod.prepare(data_mod.PYTHON_DOCS, data, tokenizer_path=str(tok_dir))
    cfg = experiment_config(INT4_EXPERIMENT_MODEL, data)
    model_changed = _model_changed(out, cfg)
    common = dict(model=str(out / "config.json"), data=data, seq_len=seq_len, micro_batch=micro_batch, keep=1,
                  threads=threads, progress=progress)
    summary: dict = {"steps": steps, "stage_steps": stage_steps, "stage_lr": stage_lr, "vocab_size": cfg.vocab_size,
                     "tokens": steps * seq_len * micro_batch, "model": INT4_EXPERIMENT_MODEL, "seeds": {}}
    for seed in seeds:
        runs = {f"bf16_s{seed}": TrainConfig(out=str(out / f"bf16_s{seed}"), steps=steps, warmup=max(1, steps // 30),
                                             seed=seed, **common)}
        runs[f"qat_s{seed}"] = TrainConfig(**{**vars(runs[f"bf16_s{seed}"]), "out": str(out / f"qat_s{seed}"),
                                              "qat": "int4"})
        start = str(out / f"bf16_s{seed}" / "checkpoints" / f"step_{steps:07d}")
        stage = dict(steps=stage_steps, warmup=max(1, stage_steps // 15), lr=stage_lr, init=start, seed=seed, **common)
        runs[f"stage_bf16_s{seed}"] = TrainConfig(out=str(out / f"stage_bf16_s{seed}"), **stage)
        runs[f"stage_qat_s{seed}"] = TrainConfig(out=str(out / f"stage_qat_s{seed}"), qat="int4", **stage)
        evals, base_reused = {}, True
        for name, tc in runs.items():
            # a stage starts from the bf16 run's weights: a retrained bf16 run retrains its stages
            reused = fresh_unless_same(tc, name, force=model_changed or (tc.init is not None and not base_reused))
            if name.startswith("bf16_"):
                base_reused = reused
            train(tc)  # a finished run resumes from its last checkpoint and stops at once
            model = load(Path(tc.out) / "checkpoints" / f"step_{tc.steps:07d}", dtype=torch.float32).eval()
            full = eval_loss(model, data, seq_len, eval_batches)
            evals[name] = {"full_precision": full, "int4": eval_loss(quantize_model(model), data, seq_len, eval_batches)}
        rows = {}
        for setting, bf16, qat in (("from_scratch", f"bf16_s{seed}", f"qat_s{seed}"),
                                   ("k2_stage", f"stage_bf16_s{seed}", f"stage_qat_s{seed}")):
            ref, rtn, q = evals[bf16]["full_precision"], evals[bf16]["int4"], evals[qat]["int4"]
            rows[setting] = {"bf16": ref, "rtn_int4": rtn, "qat_master": evals[qat]["full_precision"], "qat_int4": q,
                             "rtn_vs_bf16_pct": 100 * (rtn / ref - 1), "qat_int4_vs_bf16_pct": 100 * (q / ref - 1),
                             "qat_int4_vs_rtn_pct": 100 * (q / rtn - 1)}
        summary["seeds"][str(seed)] = rows
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cli_experiment(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="moonlet experiment", description="Reproduce a paper result at small scale.")
    sub = ap.add_subparsers(dest="name", required=True)
    p = sub.add_parser("muonclip", help="vanilla Muon vs MuonClip vs AdamW on a small MoE",
                       description="K2's MuonClip result at CPU scale: vanilla Muon at an aggressive lr lets the max "
                       "attention logit grow far above tau; MuonClip caps it at tau with equal or better loss; AdamW "
                       "vs Muon loss at equal tokens. Writes OUT/{muon,muonclip,adamw}/metrics.jsonl, summary.json "
                       "and muonclip_max_logits.png / muonclip_loss.png.")
    p.add_argument("--data", default="data/python-docs", help="data directory (default: %(default)s)")
    p.add_argument("--out", default="runs/muonclip", help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="steps per run (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-2, help="Muon/MuonClip lr, aggressive: 100x K2's 2e-4 (default: "
                   "%(default)s; docs/experiments/muonclip.md also reports 0.05 x 200 steps and 0.01 x 500)")
    p.add_argument("--adamw-lr", type=float, default=3e-3, help="AdamW baseline lr (default: %(default)s)")
    p.add_argument("--tau", type=float, default=100.0, help="QK-Clip threshold (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each setting the init and data order; "
                   "several train in OUT/seed{N} and OUT/summary.json adds the claims across seeds "
                   "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    q = sub.add_parser("int4", help="bf16 vs RTN INT4 vs QAT INT4 routed experts at equal tokens",
                       description="K2 Thinking's INT4 QAT at CPU scale (docs/experiments/int4.md): per seed, bf16 and "
                       "--qat int4 runs from scratch, then a stage from the bf16 run with and without QAT (K2's "
                       "recipe); each evaluated on the val split in full precision and with INT4 experts. Writes "
                       "OUT/summary.json. Defaults take ~40 min per seed on one CPU core.")
    q.add_argument("--data", default=None, help="a `moonlet data prepare` directory (default: build a --vocab-size "
                   "BPE and its dataset from the Python docs in OUT; a small vocabulary puts the compute in the experts)")
    q.add_argument("--vocab-size", type=int, default=2048, help="tokenizer size when --data is not given "
                   "(default: %(default)s)")
    q.add_argument("--out", default="runs/int4", help="output directory (default: %(default)s)")
    q.add_argument("--steps", type=int, default=3000, help="steps from scratch (default: %(default)s)")
    q.add_argument("--stage-steps", type=int, default=300, help="steps of the later stage (default: %(default)s)")
    q.add_argument("--stage-lr", type=float, default=2e-4, help="peak lr of the later stage, K2's (default: %(default)s)")
    q.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    q.add_argument("--seq-len", type=int, default=256, help="(default: %(default)s)")
    q.add_argument("--micro-batch", type=int, default=8, help="(default: %(default)s)")
    q.add_argument("--eval-batches", type=int, default=36, help="val batches of 8 windows (default: %(default)s, "
                   "all of the default val split)")
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    q.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = ap.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        ap.error(f"--seeds: distinct comma-separated integers >= 0, got {args.seeds!r}")
    try:
        if args.name == "int4":
            summary = int4_experiment(Path(args.out), args.data, args.steps, args.stage_steps, args.stage_lr,
                                      seeds, args.seq_len, args.micro_batch,
                                      args.vocab_size, args.eval_batches, args.threads)
        else:
            summary = muonclip_seeds(Path(args.out), seeds, data=args.data, steps=args.steps, lr=args.lr,
                                     adamw_lr=args.adamw_lr, tau=args.tau, seq_len=args.seq_len,
                                     micro_batch=args.micro_batch, weight_decay=args.weight_decay,
                                     threads=args.threads)
    except FileNotFoundError as e:
        print(f"moonlet experiment: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))
    return 0
