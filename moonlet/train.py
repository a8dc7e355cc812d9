"""One training loop for pretraining and SFT: MuonClip (moonlet.optim), aux-loss-free balancing, warmup +
WSD / cosine schedule, gradient accumulation, data parallel, periodic eval, atomic checkpoints with exact
resume, metrics.jsonl and a progress bar. The run directory (checkpoints, the resume check, metrics) is
moonlet.runs; plots and the MuonClip experiment live in moonlet.train_reports, the training benchmark in
moonlet.train_bench.

Exact resume: the data order is a pure function of (seed, sequence index), the schedule of the step, and a
checkpoint holds fp32 weights (+ router biases), the optimizer state, the data position and every RNG
state, so 10 steps + resume + 10 steps reproduce 20 straight steps bit for bit on CPU.

Data parallel (`torchrun --nproc_per_node N moonlet train ...`, gloo on CPU, nccl on GPU): rank r reads its
slice of each step's global batch, the loss of every micro-batch is its masked token-loss sum divided by
the *global* number of target tokens of the step, and gradients are all-reduced with SUM, so the update
equals one process's at the same global batch. Muon then runs on full matrices on every rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moonlet import optim
from moonlet.cli import at_least, number_in
from moonlet.config import ConfigError, ModelConfig
from moonlet.loss import head_cross_entropy
from moonlet.runs import (
    RUNTIME_FIELDS,
    ResumeError,
    latest_checkpoint,
    load_train_state,
    read_metrics_file,
    resume_changes,
    save_checkpoint,
    set_rng_state,
)

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


@dataclass
class TrainConfig:
    model: str = "nano"  # preset name, config.json path, or checkpoint directory
    init: str | None = None  # checkpoint directory to start from (SFT); else random init
    data: str = "data/python-docs"
    out: str = "runs/run"
    steps: int = 1000
    stop_at: int | None = None  # checkpoint and exit after this step (the schedule still spans `steps`)
    seq_len: int = 512
    micro_batch: int = 8
    grad_accum: int = 1
    optimizer: str = "muon"
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 50
    schedule: str = "wsd"
    decay_frac: float = 0.2
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    qk_clip_tau: float | None = 100.0  # None: no clip (max logits are still measured with muon)
    bias_update: float = 1e-3
    aux_loss_alpha: float = 0.0
    eval_every: int = 0
    eval_batches: int = 4
    save_every: int = 0
    keep: int = 2
    seed: int = 0
    ns_dtype: str = "bfloat16"
    precision: str = "amp"  # amp: fp32 weights, bf16 autocast on GPU; bf16: bf16 weights, fp32 masters in the optimizer
    compile: bool = False
    qat: str | None = None
    peak_tflops: float | None = None
    threads: int | None = None  # torch intra-op threads (1 avoids OpenMP thrashing on small shared CPUs)
    progress: bool = True


# ------------------------------------------------------------------------------------------------------
# helpers: schedule, devices, costs


def lr_factor(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then constant + linear decay over the last decay_frac (WSD), cosine, or constant."""
    if step < tc.warmup:
        return (step + 1) / tc.warmup
    lo = tc.min_lr_ratio
    if tc.schedule == "wsd":
        decay_start = int(tc.steps * (1 - tc.decay_frac))
        if step < decay_start:
            return 1.0
        return lo + (1 - lo) * max(0.0, 1 - (step - decay_start) / max(1, tc.steps - decay_start))
    if tc.schedule == "cosine":
        t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return 1.0


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilization to 3 significant digits (a tiny test model's 4e-5 is not rounded to 0)."""
    return float(f"{flops_per_token * tokens_per_s / peak:.3g}")


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """3 x forward FLOPs on *active* parameters, attention over the full context (PaLM's MFU convention)."""
    from moonlet.costs import flops_per_token

    return 3.0 * flops_per_token(cfg, seq_len)["total"]


def allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """SUM the gradients over ranks in one flat buffer (missing grads count as zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


# ------------------------------------------------------------------------------------------------------
# the loop


class TrainError(RuntimeError):
    """Training cannot go on (a non-finite loss)."""


class Stop:
    """SIGINT / SIGTERM ask the loop to checkpoint and exit after the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def weight_dtype(tc: TrainConfig) -> torch.dtype:
    """The dtype the model's weights are held in: --precision bf16 trades the fp32 weights and autocast's casts
    of them for bf16 weights and gradients (the update still runs on fp32 masters: MuonAdamW.step)."""
    if tc.precision not in ("amp", "bf16"):
        raise SystemExit(f"moonlet train --precision {tc.precision!r}: choose 'amp' or 'bf16'")
    return torch.bfloat16 if tc.precision == "bf16" else torch.float32


def train_autocast(device: torch.device, precision: str = "amp"):
    """bf16 autocast over fp32 weights on GPU (--precision amp); fp32 on the CPU; none for bf16 weights."""
    on = device.type == "cuda" and precision == "amp"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def build_model(tc: TrainConfig, device: torch.device, resuming: Path | None = None):
    """The model to train. `resuming`: the run's checkpoint, whose weights load next, so a fine-tune is built from
    its config rather than by loading its --init checkpoint again (which may have moved since)."""
    from moonlet import checkpoint

    dtype = weight_dtype(tc)
    if tc.init and resuming is not None:
        model = checkpoint.build(ModelConfig.from_hf(resuming), device=device, dtype=dtype)
    elif tc.init:
        model = checkpoint.load(tc.init, device=device, dtype=dtype)
        dense_experts(model)
    else:
        # initialized in fp32 and then cast, so --precision bf16 starts from the rounded fp32 init
        model = checkpoint.build(checkpoint.model_config(tc.model), device=device, dtype=torch.float32)
        model.init_weights(seed=tc.seed)
        if dtype != torch.float32:
            model = checkpoint.cast_weights(model, dtype)
    if tc.qat:
        try:
            from moonlet.quant import enable_qat
        except ImportError as e:
            raise SystemExit(f"moonlet train --qat {tc.qat}: moonlet.quant.enable_qat is not available ({e})") from e
        if tc.qat != "int4":
            raise SystemExit(f"moonlet train --qat {tc.qat!r}: only 'int4' is supported")
        enable_qat(model)
    return model


@torch.no_grad()
def dense_experts(model) -> int:
    """INT4-packed routed experts (a `moonlet quantize` checkpoint) -> trainable fp32 Experts holding their
    dequantized weights, so SFT trains them and --qat int4 applies; the config drops its compressed-tensors
    quantization_config, so the run's checkpoints are plain ones. Returns the layers converted."""
    from moonlet.model import Experts
    from moonlet.quant import PROJS, Int4Experts

    n = 0
    for moe in model.moe_layers():
        if isinstance(moe.experts, Int4Experts):
            dense = Experts(model.cfg).to(moe.gate.weight.device)
            for proj in PROJS:
                getattr(dense, proj).copy_(moe.experts.dequantized(proj, torch.float32))
            moe.experts, n = dense, n + 1
    if n or (model.cfg.quantization_config or {}).get("quant_method") == "compressed-tensors":
        model.cfg.extra.pop("quantization_config", None)
    return n


def check_fits(tc: TrainConfig, cfg: ModelConfig, data) -> None:
    """Errors before training rather than an IndexError in F.embedding or positions past the rope's range."""
    from moonlet.data import DataError

    if data.shards.meta["vocab_size"] > cfg.vocab_size:
        raise DataError(f"{tc.data}: token ids go up to {data.shards.meta['vocab_size'] - 1} (tokenizer "
                        f"{data.shards.meta.get('tokenizer')!r}, vocab_size {data.shards.meta['vocab_size']}), but "
                        f"the model's vocab_size is {cfg.vocab_size}: prepare the data with the model's tokenizer, "
                        "or use a model whose vocab_size covers the data's")
    # max_position_embeddings already includes a YaRN extension (K2: 4096 x 64 = 262144), so longer is beyond
    # every position the model was built for
    if tc.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {tc.seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")


@torch.no_grad()
def evaluate(model, data, tc: TrainConfig, device, autocast) -> float:
    tracking = [a.track_max_logits for a in model.attention_layers()]
    optim.track_max_logits(model, False)
    model.eval()
    total, count = 0.0, 0
    for b in range(tc.eval_batches):
        x, y, m = (t.to(device) for t in data.batch(b * tc.micro_batch, tc.micro_batch))
        with autocast:
            total += float(head_cross_entropy(model, model(x, head=False), y, m)[0])
        count += int(m.sum())
    model.train()
    for a, on in zip(model.attention_layers(), tracking):
        a.track_max_logits = on
    return total / max(count, 1)


def train(tc: TrainConfig) -> dict:
    """Run (or resume) a training run in tc.out; returns a summary with the per-step losses."""
    from moonlet import checkpoint
    from moonlet.data import PackedData

    rank, world = _rank_world()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run = Path(tc.out)
    if run.exists() and not run.is_dir():  # before building anything (the run writes into it at the end)
        raise TrainError(f"--out {run} is a file; a run needs a directory")
    ckpt = latest_checkpoint(run)
    state = load_train_state(ckpt) if ckpt is not None else None
    if state is not None:  # before building anything: another model or optimizer would not even load
        changed = resume_changes(tc, state["train_config"], run)
        if rank == 0:
            note = "".join(f", {k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            print(f"moonlet train: resuming {run} at step {state['step']}{note}", file=sys.stderr)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if state is None:  # a wrong --model / --init says so before the data is read
        checkpoint.model_config(tc.init or tc.model)
    data = PackedData(tc.data, tc.seq_len, "train", seed=tc.seed)
    torch.manual_seed(tc.seed)
    model = build_model(tc, device, ckpt)
    cfg = model.cfg
    check_fits(tc, cfg, data)
    opt = optim.build_optimizer(model, tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay,
                                ns_dtype=getattr(torch, tc.ns_dtype))
    val = None
    if tc.eval_every:
        try:
            val = PackedData(tc.data, tc.seq_len, "val", shuffle=False)
        except Exception as e:  # noqa: BLE001  (a tiny corpus may have no val split)
            print(f"moonlet train: no eval ({e})", file=sys.stderr)
    step, position = 0, 0
    if state is not None:
        checkpoint.load_weights(model, ckpt)
        given = [(g["base_lr"], g["weight_decay"]) for g in opt.param_groups]
        opt.load_state_dict(state["optimizer"])  # (that restores the saved groups' lr and weight decay too)
        for g, (lr, wd) in zip(opt.param_groups, given):  # a resume may retune them (resume_changes printed it)
            g["base_lr"], g["weight_decay"] = lr, wd
        set_rng_state(state["rng"])
        step, position = state["step"], state["data_position"]
    tokenizer_dir = data.shards.meta.get("tokenizer_dir")
    if rank == 0:
        from moonlet.tokenizer import atomic_write

        run.mkdir(parents=True, exist_ok=True)
        atomic_write(run / "train_config.json", json.dumps(dataclasses.asdict(tc), indent=2) + "\n")
        metrics_file = run / "metrics.jsonl"
        if metrics_file.exists():  # drop records past the checkpoint we resume from (and a torn last line)
            kept = [r for r in read_metrics_file(metrics_file) if r["step"] <= step]
            atomic_write(metrics_file, "".join(json.dumps(r) + "\n" for r in kept))
        metrics = open(metrics_file, "a")
    optim.track_max_logits(model)  # QK-Clip needs them; with --no-qk-clip they are still measured
    balancer = optim.RouterBalancer(model, tc.bias_update)
    params = [p for p in model.parameters() if p.requires_grad]
    fwd_model = torch.compile(model) if tc.compile else model
    autocast = train_autocast(device, tc.precision)
    flops_tok = train_flops_per_token(cfg, tc.seq_len)
    peak = peak_flops(device, tc.peak_tflops)
    per_step = tc.micro_batch * tc.grad_accum * world
    losses: list[float] = []
    bar, last_eval = None, None
    if rank == 0 and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc=f"train {run.name}", dynamic_ncols=True)
    stopped = None
    with Stop() as stop:
        end = min(tc.steps, tc.stop_at or tc.steps)
        while step < end:
            t0 = time.perf_counter()
            optim.set_lr(opt, lr_factor(step, tc))
            batches = [data.batch(position + (m * world + rank) * tc.micro_batch, tc.micro_batch)
                       for m in range(tc.grad_accum)]
            n_tgt = torch.tensor(float(sum(int(b[2].sum()) for b in batches)))
            if world > 1:
                dist.all_reduce(n_tgt)
            loss_sum = torch.zeros((), device=device)
            for x, y, mask in batches:
                x, y, mask = x.to(device), y.to(device), mask.to(device)
                with autocast:
                    loss, ce = head_cross_entropy(model, fwd_model(x, head=False), y, mask / n_tgt.clamp(min=1))
                if tc.aux_loss_alpha:
                    loss = loss + optim.seq_aux_loss(model, x.shape[0], tc.aux_loss_alpha) / (tc.grad_accum * world)
                loss.backward()
                balancer.accumulate()
                loss_sum += (ce * mask.flatten()).sum()
            if world > 1:
                allreduce_grads(params)
                dist.all_reduce(loss_sum)
            gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            loss_value, gnorm_value = float(loss_sum) / max(float(n_tgt), 1.0), float(gnorm)
            if not (math.isfinite(loss_value) and math.isfinite(gnorm_value)):  # before NaN reaches the weights
                raise TrainError(f"step {step + 1}: loss {loss_value}, grad norm {gnorm_value}; stopped before "
                                 "updating the weights (the last checkpoint, if any, is intact: resume from it with "
                                 "a lower --lr, or check the data)")
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec = {"step": step + 1, "loss": loss_value, "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm_value}
            rec.update(optim.qk_clip(model, tc.qk_clip_tau, opt))
            rec.update(balancer.step())
            step += 1
            position += per_step
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tokens = per_step * tc.seq_len
            rec.update(tokens=step * tokens, tokens_per_s=round(tokens / dt, 1), step_s=round(dt, 4))
            if peak:
                rec["mfu"] = mfu(flops_tok, tokens / dt, peak)
            if val is not None and step % tc.eval_every == 0:
                rec["eval_loss"] = last_eval = evaluate(model, val, tc, device, autocast)
            losses.append(rec["loss"])
            if rank == 0:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                if bar is not None:
                    post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
                    if "mfu" in rec:
                        post["mfu"] = f"{rec['mfu']:.1%}"
                    if "max_logit" in rec:
                        post["maxlogit"] = f"{rec['max_logit']:.1f}"
                    if last_eval is not None:
                        post["eval"] = f"{last_eval:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
            flag = torch.tensor(float(stop.signal or 0))
            if world > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopped = int(flag) or None
            if (tc.save_every and step % tc.save_every == 0) or step == end or stopped:
                if rank == 0:
                    save_checkpoint(run, step, model, opt, tc, position, tc.keep, tokenizer_dir)
                if world > 1:
                    dist.barrier()
            if stopped:
                break
    if bar is not None:
        bar.close()
    if rank == 0:
        metrics.close()
    return {"step": step, "losses": losses, "stopped_by_signal": stopped, "run": str(run), "eval_loss": last_eval}


# ------------------------------------------------------------------------------------------------------
# CLI: moonlet train


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    ap = argparse.ArgumentParser(
        prog="moonlet train",
        description="Pretrain or SFT a K2-architecture model with MuonClip. Resumes from OUT/checkpoints when it "
        "exists (--resume makes that required). Data parallel: torchrun --nproc_per_node N -m moonlet.cli train ...")
    a = ap.add_argument
    a("--model", default=d.model, help="preset (tiny, nano, small, moe-2b, ...), config.json or checkpoint dir "
      "(default: %(default)s)")
    a("--init", default=None, help="start from this checkpoint's weights (SFT); default: random init")
    a("--data", default=d.data, help="data directory from `moonlet data prepare` (text or SFT) (default: %(default)s)")
    a("--out", default=d.out, help="run directory: metrics.jsonl, checkpoints/ (default: %(default)s)")
    a("--resume", action="store_true", help="require a checkpoint in --out and continue from it exactly. Any resume "
      "takes the options not given from the checkpoint's config and refuses given ones that change the run "
      "(model, init, data, optimizer, qat, seq-len, micro-batch, grad-accum, seed, ns-dtype, precision); schedule options "
      "(steps, stop-at, save-every, eval-every, keep, lr, ...) may change")
    a("--steps", type=at_least(1), default=d.steps, help="total optimizer steps (default: %(default)s)")
    a("--stop-at", type=at_least(1), default=None, help="checkpoint and exit after this step; resume later (the schedule "
      "still spans --steps)")
    a("--seq-len", type=at_least(1), default=d.seq_len, help="tokens per sequence (default: %(default)s)")
    a("--micro-batch", type=at_least(1), default=d.micro_batch, help="sequences per forward per rank (default: %(default)s)")
    a("--grad-accum", type=at_least(1), default=d.grad_accum, help="micro-batches per step; global batch = micro-batch x "
      "grad-accum x ranks (default: %(default)s)")
    a("--optimizer", choices=["muon", "adamw"], default=d.optimizer, help="muon: Muon for hidden matrices + AdamW for "
      "embeddings/head/norms; adamw: AdamW everywhere (default: %(default)s)")
    a("--lr", type=number_in(0, open_lo=True), default=d.lr, help="peak learning rate, shared by Muon (RMS-matched) and AdamW "
      "(default: %(default)s)")
    a("--weight-decay", type=number_in(0), default=d.weight_decay, help="decoupled weight decay (not on norms/biases) "
      "(default: %(default)s)")
    a("--warmup", type=at_least(0), default=d.warmup, help="linear warmup steps; 0 = none (default: %(default)s)")
    a("--schedule", choices=["wsd", "cosine", "constant"], default=d.schedule, help="after warmup: warmup-stable-decay, "
      "cosine, or constant (default: %(default)s)")
    a("--decay-frac", type=number_in(0, 1), default=d.decay_frac, help="WSD: fraction of steps in the final linear decay "
      "(default: %(default)s)")
    a("--min-lr-ratio", type=number_in(0, 1), default=d.min_lr_ratio, help="final lr / peak lr (default: %(default)s)")
    a("--grad-clip", type=number_in(0), default=d.grad_clip, help="max global grad norm, 0 = off (default: %(default)s)")
    a("--qk-clip-tau", type=number_in(0, open_lo=True), default=d.qk_clip_tau, help="QK-Clip threshold tau; heads whose max logit exceeds "
      "it are rescaled after each step (default: %(default)s)")
    a("--no-qk-clip", action="store_true", help="vanilla Muon: measure max logits but never clip")
    a("--bias-update", type=number_in(0), default=d.bias_update, help="aux-loss-free balancing speed u; 0 = off "
      "(default: %(default)s, DeepSeek-V3's long-run value; short runs balance with 0.01: docs/experiments/balancing.md)")
    a("--aux-loss-alpha", type=number_in(0), default=d.aux_loss_alpha, help="sequence-wise balance loss weight "
      "(DeepSeek-V3: ~1e-4); 0 = off (default: %(default)s)")
    a("--eval-every", type=at_least(0), default=d.eval_every, help="eval loss on the val split every N steps; 0 = off (default: %(default)s)")
    a("--eval-batches", type=at_least(1), default=d.eval_batches, help="micro-batches per eval (default: %(default)s)")
    a("--save-every", type=at_least(0), default=d.save_every, help="checkpoint every N steps (always at the end and on "
      "SIGINT/SIGTERM); 0 = only then")
    a("--keep", type=at_least(0), default=d.keep, help="checkpoints to keep; 0 = all (default: %(default)s)")
    a("--seed", type=at_least(0), default=d.seed, help="init and data-order seed (default: %(default)s)")
    a("--ns-dtype", choices=["bfloat16", "float32"], default=d.ns_dtype, help="Newton-Schulz precision "
      "(default: %(default)s)")
    a("--precision", choices=["amp", "bf16"], default=d.precision, help="amp: fp32 weights, bf16 autocast on GPU "
      "(fp32 on the CPU); bf16: bf16 weights and gradients, the optimizer updating fp32 master copies (no casts "
      "per forward, half the gradient memory; gradient accumulation sums in bf16) (default: %(default)s)")
    a("--compile", action="store_true", help="torch.compile the model (GPU)")
    a("--qat", choices=["int4"], default=None, help="quantization-aware training of the routed experts "
      "(moonlet.quant.enable_qat: INT4 g32 fake-quant with STE)")
    a("--peak-tflops", type=number_in(0, open_lo=True), default=None, help="peak FLOP/s of the device for MFU (auto on known GPUs)")
    a("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--json", action="store_true", help="print a JSON summary as the last line")
    return ap


def given_options(argv: list[str]) -> set[str]:
    """The TrainConfig fields the command line sets (argv parsed again with every default suppressed)."""
    ap = _parser()
    for action in ap._actions:  # (set_defaults would also put SUPPRESS into the namespace)
        action.default = argparse.SUPPRESS
    given = set(vars(ap.parse_args(argv)))
    return {"qk_clip_tau" if g == "no_qk_clip" else "progress" if g == "no_progress" else g for g in given}


def config_from_args(args: argparse.Namespace, given: set[str] | None = None, saved: dict | None = None) -> TrainConfig:
    """The run's TrainConfig; on a resume (`saved`: the checkpoint's config) options not `given` on the command
    line take the saved values, so `moonlet train --out RUN --resume` continues the run as it was configured."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    if args.no_qk_clip:
        tc.qk_clip_tau = None
    tc.progress = not args.no_progress
    for k, v in (saved or {}).items():
        if k in names and k not in (given or set()) and k not in RUNTIME_FIELDS:
            setattr(tc, k, v)
    return tc


def cli_train(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    ckpt = latest_checkpoint(Path(args.out))
    if args.resume and ckpt is None:
        print(f"moonlet train --resume: no checkpoint in {args.out}/checkpoints", file=sys.stderr)
        return 2
    tc = config_from_args(args, given_options(argv), load_train_state(ckpt)["train_config"] if ckpt else None)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    from moonlet.cli import user_errors

    try:
        out = train(tc)
    except (*user_errors(), ResumeError, TrainError) as e:
        print(f"moonlet train: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        losses = out.pop("losses")
        summary = {**out, "final_loss": losses[-1] if losses else None}
        if args.json:
            print(json.dumps(summary))
        else:
            loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
            evals = f", eval loss {out['eval_loss']:.4f}" if out.get("eval_loss") is not None else ""
            print(f"done: step {out['step']}, loss {loss}{evals}" if not out["stopped_by_signal"] else
                  f"stopped by signal {out['stopped_by_signal']} at step {out['step']} (loss {loss}{evals}); the "
                  f"checkpoint is saved: continue with moonlet train --out {args.out} --resume")
    return 128 + out["stopped_by_signal"] if out["stopped_by_signal"] else 0
