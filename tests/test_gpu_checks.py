"""scripts/gpu_checks.sh is the one call a lent GPU gets (15 minutes of device time in all): its commands must
still be valid when that call comes. Here they run on tiny shapes on the CPU (MOONLET_GPU_SMOKE=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_checks_script_runs_its_decode_and_train_stages_on_tiny_shapes(tmp_path):
    env = os.environ | {"MOONLET_GPU_SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    for stage in ("decode", "train", "decode-compile", "int4-gemv-rows", "head-loss"):
        run = subprocess.run(["bash", "scripts/gpu_checks.sh", stage], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stages = (tmp_path / "stages.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in stages] == ["== decode", "== train", "== decode_compile", "== int4_gemv_rows",
                                                      "== head_loss"]
    assert all("exit 0" in s for s in stages)
    compiled = json.loads((tmp_path / "decode_compile.log").read_text().splitlines()[-1])
    assert {r["moonlet_decode"] for r in compiled["results"]} == {"compiled"}  # CPU: no graphs
    decode = json.loads((tmp_path / "decode.log").read_text().splitlines()[-1])
    rows = {(r["quant"], r["batch"]): r for r in decode["results"]}
    assert set(rows) == {("none", 1), ("none", 2), ("int4", 1), ("int4", 2)}
    assert rows["none", 1]["hf_tokens_per_s"] > 0 and rows["int4", 1]["speedup_vs_unquantized"] > 0
    train = json.loads((tmp_path / "train.log").read_text().splitlines()[-1])
    runs = {"muon", "adamw", "muon_bf16", "adamw_bf16"}  # each optimizer with fp32 (+autocast) and bf16 weights
    assert set(train["moonlet"]) == runs and set(train["speedup_vs_hf"]) == runs
    head = json.loads((tmp_path / "head_loss.log").read_text().splitlines()[-1])
    assert head["fused"]["s"] > 0 and head["unfused"]["s"] > 0 and head["memory_ratio"] > 0
    # where the time goes, for the sessions after the GPU is gone: ops ranked by their time, shares summing to <= 1
    for profile in [r["profile"] for r in rows.values()] + [r["profile"] for r in train["moonlet"].values()]:
        assert profile and all(p["us"] > 0 and p["calls"] > 0 for p in profile)
        assert [p["us"] for p in profile] == sorted((p["us"] for p in profile), reverse=True)
        assert sum(p["share"] for p in profile) <= 1.0001
