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
    for stage in ("decode", "train"):
        run = subprocess.run(["bash", "scripts/gpu_checks.sh", stage], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stages = (tmp_path / "stages.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in stages] == ["== decode", "== train"] and all("exit 0" in s for s in stages)
    decode = json.loads((tmp_path / "decode.log").read_text().splitlines()[-1])
    rows = {(r["quant"], r["batch"]): r for r in decode["results"]}
    assert set(rows) == {("none", 1), ("none", 2), ("int4", 1), ("int4", 2)}
    assert rows["none", 1]["hf_tokens_per_s"] > 0 and rows["int4", 1]["speedup_vs_unquantized"] > 0
    train = json.loads((tmp_path / "train.log").read_text().splitlines()[-1])
    assert set(train["moonlet"]) == {"muon", "adamw"} and set(train["speedup_vs_hf"]) == {"muon", "adamw"}
