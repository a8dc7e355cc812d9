"""`moonlet bench <what>`: benchmarks that run moonlet and its peer side by side in one process and print
one JSON object last. Each benchmark lives with the code it measures; this table only dispatches."""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name -> ("module:function", help). The function takes argv (list[str]) and returns an exit code.
BENCHES: dict[str, tuple[str, str]] = {
    "tokenizer": ("moonlet.tokenizer:cli_bench_tokenizer", "tokenizer encode/decode MB/s vs HF tokenizers, id parity"),
    "decode": ("moonlet.generate:cli_bench_decode", "engine decode tokens/s, GB/s, roofline vs HF generate (--compare hf)"),
    "prefix-cache": ("moonlet.generate:cli_bench_prefix_cache", "time to first token with vs without a prefix-cache hit"),
    "serve": ("moonlet.server_bench:cli_bench_serve", "concurrent streaming clients vs `moonlet serve`: failures, p50/p99, tokens/s"),
    "train": ("moonlet.train_bench:cli_bench_train", "training step tokens/s and MFU vs HF transformers (--compare hf)"),
}


def top_kernels(make_step, device: torch.device, rows: int = 20) -> list[dict] | str:
    """Build a step with make_step(), run it once to warm up and once under torch.profiler: the ops (CUDA:
    kernels) that took the most device time, with their share. A lent GPU's minutes are few; this tells a later
    CPU-only session where a step's time goes. A failure (out of memory, no profiler here) comes back as a
    message: profiling must not cost the benchmark its numbers."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        step = make_step()
        step()
        with profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize(device)
    except Exception as e:
        return f"profile failed: {type(e).__name__}: {e}"[:300]
    avgs = prof.key_averages()
    if cuda:  # kernels by their GPU time (else ops by the GPU time of their own kernels)
        timed = [e for e in avgs if e.self_device_time_total]
        kernels = [e for e in timed if e.device_type == torch.autograd.DeviceType.CUDA]
        totals = {e.key: (e.self_device_time_total, e.count) for e in kernels or timed}
    else:  # aten ops by their own CPU time
        totals = {e.key: (e.self_cpu_time_total, e.count) for e in avgs if e.key.startswith("aten::")}
    total = sum(t for t, _ in totals.values()) or 1.0
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]
    return [{"name": name[:120], "us": round(t, 1), "calls": n, "share": round(t / total, 4)}
            for name, (t, n) in top]


def cli_bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, BENCHES), default=4)
        print("usage: moonlet bench <what> [options]   (moonlet bench <what> --help for details)\n\nbenchmarks:")
        for name, (_, help_) in BENCHES.items():
            print(f"  {name:<{width}}  {help_}")
        return 0
    if argv[0] not in BENCHES:
        print(f"moonlet bench: unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    module, func = BENCHES[argv[0]][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
