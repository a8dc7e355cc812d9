"""Time and peak memory of the LM head + cross-entropy, forward and backward: moonlet.loss's fused, chunked
version against the unfused `F.cross_entropy(lm_head(h).float())`, side by side. Peak memory is each variant's
peak RSS growth (CPU) or peak allocated bytes (CUDA), measured in a fresh subprocess. Prints JSON lines.

    PYTHONPATH=. python scripts/head_loss_bench.py                  # CPU shapes
    PYTHONPATH=. python scripts/head_loss_bench.py --shapes 16384x1024x32768,16384x1024x163840 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from moonlet.loss import head_cross_entropy


def run(n: int, d: int, v: int, variant: str, dtype: torch.dtype, device: str, reps: int) -> dict:
    torch.manual_seed(0)
    model = nn.Module()
    model.lm_head = nn.Linear(d, v, bias=False, device=device, dtype=dtype)
    h0 = torch.randn(n, d, device=device, dtype=dtype)
    y = torch.randint(0, v, (n,), device=device)
    coef = torch.full((n,), 1 / n, device=device)

    def step():
        h = h0.clone().requires_grad_()
        if variant == "fused":
            head_cross_entropy(model, h, y, coef)[0].backward()
        else:
            (F.cross_entropy(model.lm_head(h).float(), y, reduction="none") * coef).sum().backward()
        model.lm_head.weight.grad = None

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step()
    sync()
    peak = (torch.cuda.max_memory_allocated() - base if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    sync()
    return {"variant": variant, "s": round((time.perf_counter() - t0) / reps, 5), "peak_mib": peak >> 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1024x256x32768,4096x256x32768,2048x1024x32768,2048x512x163840",
                    help="comma-separated tokens x hidden x vocab")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "SHAPE,VARIANT" in this subprocess
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.one:
        shape, variant = args.one.split(",")
        print(json.dumps(run(*map(int, shape.split("x")), variant, dtype, device, args.reps)))
        return
    for shape in args.shapes.split(","):
        res = {}
        for variant in ("unfused", "fused"):
            out = subprocess.run([sys.executable, __file__, "--one", f"{shape},{variant}", "--dtype", args.dtype,
                                  "--reps", str(args.reps)], capture_output=True, text=True, check=True)
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        u, f = res["unfused"], res["fused"]
        print(json.dumps({"shape": shape, "device": device, "dtype": args.dtype, "unfused": u, "fused": f,
                          "speedup": round(u["s"] / f["s"], 3),
                          "memory_ratio": round(u["peak_mib"] / max(f["peak_mib"], 1), 2)}))


if __name__ == "__main__":
    main()
