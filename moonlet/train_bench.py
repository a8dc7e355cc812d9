"""`moonlet bench train`: seconds per full training step (fwd + bwd + clip + optimizer) of moonlet and of HF
transformers' DeepseekV3ForCausalLM on the same config, as tokens/s and MFU on active parameters."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from moonlet import optim
from moonlet.bench import top_kernels
from moonlet.checkpoint import model_config
from moonlet.loss import head_cross_entropy
from moonlet.train import mfu, peak_flops, train_autocast, train_flops_per_token


def _time_steps(step_fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _moonlet_train_step(cfg, optimizer: str, x: torch.Tensor, precision: str, compile_: bool, device: torch.device):
    """A closure running one moonlet training step as `moonlet train --precision P` does, and the step's
    Newton-Schulz FLOPs."""
    from moonlet import checkpoint

    model = checkpoint.build(cfg, device=device)
    model.init_weights(seed=0)
    if precision == "bf16":
        model = checkpoint.cast_weights(model, torch.bfloat16)
    autocast = train_autocast(device, precision)
    opt = optim.build_optimizer(model, optimizer, lr=1e-4)
    muon = optimizer == "muon"
    ns_flops = sum(optim.newton_schulz_flops(p.shape) for g in opt.param_groups if g["kind"] == "muon"
                   for p in g["params"])
    optim.track_max_logits(model, on=muon)
    balancer = optim.RouterBalancer(model)
    fwd = torch.compile(model) if compile_ else model
    coef = torch.full(x[:, 1:].shape, 1.0 / x[:, 1:].numel(), device=device)  # a mean over the tokens

    def step():
        with autocast:
            loss, _ = head_cross_entropy(model, fwd(x[:, :-1], head=False), x[:, 1:], coef)
        loss.backward()
        balancer.accumulate()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if muon:
            optim.qk_clip(model, 100.0, opt)
        balancer.step()

    return step, ns_flops


def _hf_train_step(cfg, mode: str, x: torch.Tensor, autocast, device: torch.device):
    """A closure running one training step of HF transformers' DeepseekV3ForCausalLM (fused AdamW on GPU):
    mode "amp" keeps fp32 weights under `autocast`, "bf16" holds bf16 weights and runs without autocast."""
    import transformers

    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf())
    hf_cfg._experts_implementation = "grouped_mm" if device.type == "cuda" else "eager"
    hf_cfg._attn_implementation = "sdpa"
    with device:  # initialized where it runs: a CPU init of a 2B model takes minutes of a lent GPU's time
        hf = transformers.DeepseekV3ForCausalLM(hf_cfg)
    hf = hf.to(torch.bfloat16 if mode == "bf16" else torch.float32)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=device.type == "cuda")
    ctx = autocast if mode == "amp" else contextlib.nullcontext()

    def step():
        with ctx:
            loss = hf(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, hf_cfg._experts_implementation


def bench_train(preset: str, batch: int, seq_len: int, steps: int, warmup: int, compare_hf: bool,
                compile_: bool = False, peak_tflops: float | None = None,
                optimizers: tuple[str, ...] = ("muon", "adamw"), profile: bool = False,
                precisions: tuple[str, ...] = ("amp",)) -> dict:
    """Seconds per full training step (fwd + bwd + clip + optimizer) of moonlet and of HF transformers'
    DeepseekV3ForCausalLM (grouped_mm experts on GPU, fused AdamW) on the same config. moonlet keeps fp32
    master weights under bf16 autocast on GPU; HF runs that way and with pure bf16 weights (see
    `_hf_train_step`), and speedups are against its faster step. moonlet runs once per optimizer: "muon" is MuonClip (Newton-Schulz on every
    hidden matrix, max-logit tracking, QK-Clip, router-bias update), "adamw" the same step with AdamW, the
    like-for-like comparison with HF; with precision "bf16" (`moonlet train --precision bf16`: bf16 weights,
    fp32 masters in the optimizer) its result is named "muon_bf16" / "adamw_bf16". MFU counts model FLOPs only (PaLM convention), so Newton-Schulz, whose
    FLOPs are reported apart, lowers Muon's MFU: it costs the same per step whatever the batch."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_config(preset)
    autocast = train_autocast(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    flops_tok = train_flops_per_token(cfg, seq_len)
    peak = peak_flops(device, peak_tflops)
    tokens = batch * seq_len

    def report(sec: float) -> dict:
        r = {"step_s": round(sec, 4), "tokens_per_s": round(tokens / sec, 1)}
        if peak:
            r["mfu"] = mfu(flops_tok, tokens / sec, peak)
        if device.type == "cuda":
            r["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return r

    out: dict = {"preset": preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "batch": batch, "seq_len": seq_len, "train_flops_per_token": flops_tok, "peak_flops": peak,
                 "moonlet": {}}
    for opt_name, precision in [(o, p) for p in precisions for o in optimizers]:
        name = opt_name if precision == "amp" else f"{opt_name}_{precision}"
        step_fn, ns_flops = _moonlet_train_step(cfg, opt_name, x, precision, compile_, device)
        if opt_name == "muon":
            out["newton_schulz_flops_per_step"] = ns_flops
        out["moonlet"][name] = report(_time_steps(step_fn, steps, warmup, device))
        if profile:
            out["moonlet"][name]["profile"] = top_kernels(lambda fn=step_fn: fn, device)
        print(json.dumps({"moonlet": name, **out["moonlet"][name]}), file=sys.stderr, flush=True)
        step_fn = None  # free the model before building the next one
    if compare_hf:
        # HF both ways on GPU: mixed precision like moonlet (fp32 master weights, bf16 autocast; its grouped_mm
        # experts then run in fp32, since HF casts inputs to the weights' dtype), and pure bf16 weights, its
        # fastest step. Speedups are against the faster of the two.
        out["hf"] = {}
        for mode in (("amp", "bf16") if device.type == "cuda" else ("amp",)):
            try:
                step_fn, impl = _hf_train_step(cfg, mode, x, autocast, device)
                out["hf"][mode] = {**report(_time_steps(step_fn, steps, warmup, device)), "optimizer": "adamw",
                                   "experts_implementation": impl}
            except Exception as e:  # the peer failing (a version, out of memory) must not cost moonlet's numbers
                out["hf"][mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
            step_fn = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        timed = [r["step_s"] for r in out["hf"].values() if "step_s" in r]
        if timed:
            out["speedup_vs_hf"] = {name: round(min(timed) / r["step_s"], 3) for name, r in out["moonlet"].items()}
    return out


def cli_bench_train(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="moonlet bench train", description="Tokens/s and MFU (on active parameters, "
                                 "PaLM convention) of moonlet's full training step vs HF transformers' on one config.")
    ap.add_argument("--preset", default="moe-2b", help="model preset or config.json (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=2048, help="(default: %(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    ap.add_argument("--compare", choices=["hf", "none"], default="none", help="also time HF transformers")
    ap.add_argument("--optimizer", default="muon,adamw", help="moonlet's optimizers, comma-separated, one run each: "
                    "muon = MuonClip (Newton-Schulz, max-logit tracking, QK-Clip), adamw = like-for-like with HF "
                    "(default: %(default)s)")
    ap.add_argument("--precision", default="amp", help="moonlet's weight precisions, comma-separated, one run each "
                    "per optimizer: amp = fp32 weights under bf16 autocast on GPU, bf16 = bf16 weights with fp32 "
                    "masters in the optimizer (as `moonlet train --precision`) (default: %(default)s)")
    ap.add_argument("--compile", action="store_true", help="torch.compile moonlet's model")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (auto on known GPUs)")
    ap.add_argument("--profile", action="store_true", help="after timing, profile one more moonlet step: the "
                    "kernels (CPU: ops) that take the time, in each optimizer's \"profile\"")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args(argv)
    if bad := set(args.optimizer.split(",")) - {"muon", "adamw"}:
        ap.error(f"--optimizer: unknown {sorted(bad)}; choose from muon, adamw")
    if bad := set(args.precision.split(",")) - {"amp", "bf16"}:
        ap.error(f"--precision: unknown {sorted(bad)}; choose from amp, bf16")
    out = bench_train(args.preset, args.batch, args.seq_len, args.steps, args.warmup, args.compare == "hf",
                      args.compile, args.peak_tflops, tuple(args.optimizer.split(",")), args.profile,
                      tuple(args.precision.split(",")))
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0
