"""lm-eval's loglikelihood tasks against `moonlet serve`, checked against the model's own forward.

EleutherAI's lm-evaluation-harness scores multiple-choice tasks through /v1/completions with echo + logprobs
(its `local-completions` model) and counts tokens with the checkpoint's HF tokenizer. This script saves the
tiny preset as a checkpoint (tokenizer.json included), serves it, runs lm_eval on a four-question task from a
local JSONL file, and recomputes every choice's loglikelihood with a plain forward pass: they must agree.

    python scripts/lm_eval_parity.py --lm-eval /path/to/venv/bin/lm_eval   # lm-eval[api] + transformers there

lm-eval is not a moonlet dependency (it pulls datasets, evaluate, scikit-learn...), so give its executable.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import moonlet
from moonlet import checkpoint
from moonlet.server_bench import spawn_server, stop_server
from moonlet.tokenizer import load_tokenizer

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "a large dog"], "answer": 0},
    {"question": "def add(a, b):\n    return", "choices": ["a + b", "None", "banana"], "answer": 0},
    {"question": "Python lists are created with", "choices": ["square brackets", "angle brackets"], "answer": 0},
    {"question": "2 + 2 =", "choices": ["4", "5", "22", "four"], "answer": 0},
]
TASK = """task: moonlet_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def model_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | everything before), split as lm-eval splits (context, then the rest)."""
    whole, k = tok.encode(context + continuation), len(tok.encode(context))
    with torch.no_grad():
        lp = model(torch.tensor([whole]))[0].log_softmax(-1)
    return sum(float(lp[i - 1, whole[i]]) for i in range(k, len(whole)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-eval", default="lm_eval", help="the lm_eval executable (default: lm_eval on PATH)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moonlet-lmeval-"))
    ckpt = work / "tiny"
    model = moonlet.load("tiny")
    checkpoint.save(model, ckpt)
    load_tokenizer(None).save(ckpt)
    tok = load_tokenizer(ckpt)
    (work / "task").mkdir()
    (work / "task" / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (work / "task" / "moonlet_mc.yaml").write_text(TASK.format(data=work / "task" / "data.jsonl"))
    proc, url = spawn_server(["--model", str(ckpt)])
    try:
        model_args = (f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={ckpt},"
                      "num_concurrent=1,max_retries=1")
        subprocess.run([args.lm_eval, "--model", "local-completions", "--model_args", model_args, "--tasks",
                        "moonlet_mc", "--include_path", str(work / "task"), "--log_samples", "--output_path",
                        str(work / "out")], check=True)
    finally:
        stop_server(proc)
    [samples] = (work / "out").rglob("samples_moonlet_mc_*.jsonl")
    worst, rows = 0.0, []
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        for choice, resp in zip(s["doc"]["choices"], s["resps"]):
            ours = model_loglikelihood(model, tok, s["doc"]["question"], " " + choice)  # lm-eval's delimiter " "
            worst = max(worst, abs(float(resp[0][0]) - ours))
            rows.append({"choice": choice, "lm_eval": round(float(resp[0][0]), 5), "model": round(ours, 5)})
    print(json.dumps({"choices": len(rows), "max_abs_diff": worst, "rows": rows}))
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
