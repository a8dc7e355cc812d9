"""Why MuonClip's logged max logit sits above tau at CPU-scale learning rates: one update's own growth, or
batch-to-batch variation? Trains the `moonlet experiment muonclip` MuonClip run and, after each step's clip,
measures the max logit again on the same batch with the clipped weights (one extra no-grad forward, which
changes nothing in the run). A diagnostic for docs/experiments/muonclip.md, not part of the package.

    PYTHONPATH=. python scripts/muonclip_overshoot.py --data data/python-docs --lr 0.02 --seed 0

For each step t that clipped, with S the max over layers and heads:
  same batch  S(weights after step t and its clip, batch t) / tau   the update's growth (1.0 if none)
  next batch  S(the same weights, batch t + 1) / S(..., batch t)    the data's variation
  logged      S(the same weights, batch t + 1) / tau                what metrics.jsonl logs at step t + 1
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from moonlet import optim
from moonlet.model import Transformer
from moonlet.train import train
from moonlet.train_reports import EXPERIMENT_MODEL, experiment_config, experiment_runs

TAU = 100.0
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--data", default="data/python-docs")
p.add_argument("--out", default="runs/muonclip_overshoot")
p.add_argument("--lr", type=float, default=0.02)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
data, out, lr, seed = args.data, Path(args.out), args.lr, args.seed
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps(experiment_config(EXPERIMENT_MODEL, data).to_hf()))
run = experiment_runs(out, data, 300, lr, 3e-3, TAU, 64, 8, 0.0, seed, threads=1, progress=False)["muonclip"]

last_input: dict = {}
steps: list[dict] = []
clip = optim.qk_clip


forward = Transformer.forward


def remember_input(model, x, *args, **kwargs):
    last_input["x"] = x.detach()
    return forward(model, x, *args, **kwargs)


def clip_then_measure_again(model, tau, opt=None):
    rec = clip(model, tau, opt)
    with torch.no_grad():
        model(last_input["x"])  # max logits are tracked and were just reset by the clip: this forward's alone
    again = max(a.max_logits.float().max().item() for a in model.attention_layers())
    for a in model.attention_layers():
        a.max_logits = None
    steps.append({"logged": rec["max_logit"], "same_batch_after_clip": again, "heads_clipped": rec["heads_clipped"]})
    return rec


optim.qk_clip = clip_then_measure_again  # train() calls optim.qk_clip(model, tau, opt) after each optimizer step
Transformer.forward = remember_input  # the model's own forward only, not every submodule's
train(run)
(out / "steps.json").write_text(json.dumps(steps))
pairs = [(steps[t]["same_batch_after_clip"], steps[t + 1]["logged"]) for t in range(len(steps) - 1)
         if steps[t]["heads_clipped"]]
if not pairs:
    sys.exit(f"no step clipped in {len(steps)} steps at lr {lr}: nothing to decompose")
stats = {"same_batch": [a / TAU for a, _ in pairs], "next_batch": [b / a for a, b in pairs],
         "logged": [b / TAU for _, b in pairs]}
summary = {"lr": lr, "seed": seed, "clipped_steps": len(pairs)}
for name, values in stats.items():
    summary |= {f"{name}_mean": round(sum(values) / len(values), 4), f"{name}_max": round(max(values), 4)}
print(json.dumps(summary))
