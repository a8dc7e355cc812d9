"""The training loop (moonlet.train): exact resume, checkpoints, signals, data parallel, schedule, plots."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moonlet import data
from moonlet.train import TrainConfig, cli_train, latest_checkpoint, lr_factor, train
from moonlet.train_reports import plot_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("Muon orthogonalizes the momentum of every hidden matrix; QK-Clip rescales the query and key "
        "weights of heads whose attention logits grow too large. ") * 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    for i in range(8):
        (src / f"doc{i}.txt").write_text(f"Document {i}. " + TEXT)
    data.prepare(src, root / "data", val_every=4)
    return root / "data"


def tc(corpus, out, **kw):
    base = dict(model="tiny", data=str(corpus), out=str(out), steps=20, seq_len=32, micro_batch=2, grad_accum=2,
                warmup=3, lr=1e-2, eval_every=0, progress=False, qk_clip_tau=0.05)
    return TrainConfig(**{**base, **kw})


def test_resume_continues_exactly(corpus, tmp_path):
    straight = train(tc(corpus, tmp_path / "a"))["losses"]
    first = train(tc(corpus, tmp_path / "b", stop_at=10))["losses"]
    assert latest_checkpoint(tmp_path / "b").name == "step_0000010"
    rest = train(tc(corpus, tmp_path / "b", steps=20))["losses"]
    assert len(straight) == 20 and first + rest == straight  # bit-identical losses
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(1, 21))
    heads = [r["heads_clipped"] for r in read_metrics(tmp_path / "a")]
    assert sum(heads) > 0  # tau=0.05 makes QK-Clip fire, so the resumed run also restored clipped weights


def test_bf16_weights_train_through_fp32_masters_and_resume_exactly(corpus, tmp_path):
    from moonlet import checkpoint

    straight = train(tc(corpus, tmp_path / "a", precision="bf16"))["losses"]
    train(tc(corpus, tmp_path / "b", precision="bf16", stop_at=10))
    rest = train(tc(corpus, tmp_path / "b", precision="bf16", steps=20))["losses"]
    assert straight[10:] == rest  # the fp32 masters, momenta and moments came back fp32 from the checkpoint
    assert sum(straight[-5:]) < sum(straight[:5])
    assert sum(r["heads_clipped"] for r in read_metrics(tmp_path / "a")) > 0  # clipped masters and bf16 alike
    ckpt = latest_checkpoint(tmp_path / "a")
    saved = load_file(ckpt / "model.safetensors")
    assert saved["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    state = torch.load(ckpt / "train_state.pt", weights_only=False)["optimizer"]["state"]
    masters = [s["master"] for s in state.values() if "master" in s]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    model = checkpoint.load(ckpt)
    assert all(m.gate.weight.dtype == torch.float32 for m in model.moe_layers())  # routers stay fp32


def test_checkpoints_are_hf_checkpoints_written_every_n_steps_keeping_the_last_k(corpus, tmp_path):
    from moonlet import checkpoint

    train(tc(corpus, tmp_path / "r", steps=6, save_every=2, keep=2, eval_every=3))
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_0000004", "step_0000006"]
    state = torch.load(tmp_path / "r/checkpoints/step_0000006/train_state.pt", weights_only=False)
    assert state["step"] == 6 and state["data_position"] == 6 * 2 * 2 and "torch" in state["rng"]
    model = checkpoint.load(tmp_path / "r/checkpoints/step_0000006")
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())  # balancing moved
    # the data's tokenizer (here moonlet's default) travels with it, in a form transformers / vLLM load as well
    from moonlet.tokenizer import load_tokenizer

    hf_tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tmp_path / "r/checkpoints/step_0000006")
    assert hf_tok.encode(TEXT, add_special_tokens=False) == load_tokenizer(None).encode(TEXT)
    recs = read_metrics(tmp_path / "r")
    assert "eval_loss" in recs[2] and recs[-1]["tokens"] == 6 * 4 * 32
    assert {"max_logit_per_layer", "heads_clipped", "expert_load_max_over_mean", "experts_without_tokens",
            "grad_norm", "tokens_per_s"} <= set(recs[-1])


def test_training_reduces_loss_with_muon_and_with_adamw(corpus, tmp_path):
    for opt in ("muon", "adamw"):
        losses = train(tc(corpus, tmp_path / opt, optimizer=opt, steps=12, grad_accum=1, qk_clip_tau=100.0))["losses"]
        assert sum(losses[-3:]) / 3 < losses[0] - 0.5, opt


def test_sft_loss_counts_only_assistant_tokens(tmp_path):
    conv = {"messages": [{"role": "user", "content": "Say hello. " * 5},
                         {"role": "assistant", "content": "Hello!", "reasoning_content": "Easy."}]}
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(conv) for _ in range(6)) + "\n")
    data.prepare(tmp_path / "sft.jsonl", tmp_path / "sft", kind="sft", val_every=0)
    out = train(tc(tmp_path / "sft", tmp_path / "run", steps=15, seq_len=24, grad_accum=1, lr=2e-2))
    assert out["losses"][-1] < 0.5 * out["losses"][0]  # the repeated assistant answer is learned


def test_lr_schedules_warm_up_then_decay():
    wsd = TrainConfig(steps=100, warmup=10, schedule="wsd", decay_frac=0.2)
    assert lr_factor(0, wsd) == pytest.approx(0.1) and lr_factor(9, wsd) == 1.0
    assert lr_factor(50, wsd) == 1.0 and lr_factor(90, wsd) == pytest.approx(0.5) and lr_factor(99, wsd) < 0.06
    cos = TrainConfig(steps=110, warmup=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(10, cos) == pytest.approx(1.0) and lr_factor(60, cos) == pytest.approx(0.55)
    assert lr_factor(110, cos) == pytest.approx(0.1)


def test_plot_writes_loss_max_logit_and_expert_load_pngs(corpus, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to read their axes
    train(tc(corpus, tmp_path / "r", steps=3))
    paths = plot_run(tmp_path / "r")
    assert [p.name for p in paths] == ["loss.png", "max_logits.png", "expert_load.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert len(figures) == 3 and all(t == int(t) for f in figures for t in f.axes[0].get_xticks())  # whole steps


def test_plot_of_several_runs_overlays_them_in_comparison_pngs(corpus, tmp_path):
    from moonlet.train_reports import cli_plot

    train(tc(corpus, tmp_path / "muon", steps=3))
    train(tc(corpus, tmp_path / "adamw", steps=3, optimizer="adamw", lr=1e-3))
    assert cli_plot([str(tmp_path / "muon"), str(tmp_path / "adamw"), "--out", str(tmp_path / "cmp"),
                     "--tau", "100"]) == 0
    for name in ("compare_loss.png", "compare_max_logits.png"):
        png = tmp_path / "cmp" / name
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert cli_plot([str(tmp_path / "muon"), str(tmp_path / "missing")]) == 2


def test_muonclip_experiment_runs_four_arms_on_one_data_order_and_plots_them(corpus, tmp_path):
    from moonlet.train_reports import muonclip_experiment

    s, logs = muonclip_experiment(tmp_path / "mc", str(corpus), steps=3, lr=2e-2, adamw_lr=3e-3, tau=0.05,
                                  seq_len=16, micro_batch=2, weight_decay=0.0, seed=0, progress=False)
    assert set(logs) == {"muon", "muonclip", "adamw", "muonclip_adamw_lr"}
    assert all(logs[n] == read_metrics(tmp_path / "mc" / n) for n in logs)  # the records the summary was made from
    assert s["muon"]["heads_clipped_total"] == 0 < s["muonclip"]["heads_clipped_total"]  # tau tiny: it must clip
    assert s["muon_peak_over_tau"] == s["muon"]["max_logit_peak"] / 0.05
    tokens = [[r["tokens"] for r in read_metrics(tmp_path / "mc" / n)] for n in ("muon", "muonclip", "adamw")]
    assert tokens[0] == tokens[1] == tokens[2] == [32, 64, 96]
    assert {p.name for p in (tmp_path / "mc").glob("*.png")} == {"muonclip_loss.png", "muonclip_max_logits.png"}
    assert s["muonclip"]["first_clip_step"] == 1 and s["muon"]["first_clip_step"] is None
    assert s["claims"]["clip_holds_tau"] == (s["muonclip"]["after_first_clip_peak_x_tau"] <= 1.0)


def test_muonclip_experiment_over_several_seeds_reports_each_claim_per_seed_and_its_spread(corpus, tmp_path,
                                                                                            capsys):
    from moonlet.train_reports import cli_experiment

    out = tmp_path / "mc"
    argv = ["muonclip", "--data", str(corpus), "--out", str(out), "--steps", "2", "--tau", "0.05", "--seq-len", "16",
            "--micro-batch", "2", "--json"]
    assert cli_experiment(argv + ["--seeds", "0,1"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s == json.loads((out / "summary.json").read_text())
    assert set(s["seeds"]) == {"0", "1"} and (out / "seed0" / "muon").is_dir() and (out / "seed1" / "adamw").is_dir()
    first = [r["loss"] for r in read_metrics(out / "seed0" / "muon")]
    assert first != [r["loss"] for r in read_metrics(out / "seed1" / "muon")]  # another init and data order
    assert s["across_seeds"]["claims"]["clip_holds_tau"] == [s["seeds"][n]["claims"]["clip_holds_tau"]
                                                            for n in ("0", "1")]
    peaks = [s["seeds"][n]["muon_peak_over_tau"] for n in ("0", "1")]
    assert s["across_seeds"]["spread"]["muon_peak_over_tau"] == {
        "min": min(peaks), "mean": pytest.approx(sum(peaks) / 2), "max": max(peaks), "seeds": 2}
    assert (out / "muonclip_seeds_max_logits.png").read_bytes()[:4] == b"\x89PNG"
    for bad in ("0,x", "1,1", "-1"):
        with pytest.raises(SystemExit):
            cli_experiment(argv + [f"--seeds={bad}"])
        assert "--seeds: distinct comma-separated integers >= 0" in capsys.readouterr().err


def test_logit_stats_say_when_vanilla_passes_tau_and_how_far_above_it_a_clipped_run_stays():
    from moonlet.train_reports import logit_stats

    logged = [(50, 0), (120, 2), (90, 0), (310, 1), (105, 1), (80, 0)]  # (max logit, heads clipped) per step
    recs = [{"step": i + 1, "max_logit": m, "heads_clipped": c} for i, (m, c) in enumerate(logged)]
    st = logit_stats(recs, tau=100.0)
    assert (st["first_step_over_tau"], st["first_step_over_3_tau"], st["first_clip_step"]) == (2, 4, 2)
    # after the first clip (step 2): steps 3-6 logged 0.9, 3.1, 1.05, 0.8 tau
    assert st["after_first_clip_mean_x_tau"] == pytest.approx((0.9 + 3.1 + 1.05 + 0.8) / 4)
    assert st["after_first_clip_peak_x_tau"] == pytest.approx(3.1) and st["after_first_clip_frac_over_tau"] == 0.5
    never = logit_stats([{"step": 1, "max_logit": 10.0, "heads_clipped": 0}], tau=100.0)
    assert never["first_step_over_tau"] is None and never["after_first_clip_peak_x_tau"] is None


def test_step_reaching_is_when_a_runs_moving_average_loss_first_matches_the_others_final_one():
    from moonlet.train_reports import step_reaching

    run = lambda losses: [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]  # noqa: E731
    adamw = run([9.0] * 10 + [5.0] * 10)
    muon = run([9.0] * 5 + [5.0] * 15)
    final = (adamw[-1]["loss"] + adamw[-2]["loss"]) / 2  # its final moving average over 2 steps: 5.0
    assert step_reaching(muon, final) == 7 and step_reaching(adamw, final) == 12
    assert step_reaching(run([6.0] * 20), final) is None


def test_int4_experiment_compares_bf16_rtn_and_qat_arms_at_equal_tokens(corpus, tmp_path):
    from moonlet.train_reports import int4_experiment

    s = int4_experiment(tmp_path / "q", str(corpus), steps=3, stage_steps=2, stage_lr=2e-4, seeds=[0], seq_len=16,
                        micro_batch=2, eval_batches=2, progress=False)
    for setting in ("from_scratch", "k2_stage"):
        row = s["seeds"]["0"][setting]
        assert row["rtn_int4"] != row["bf16"]  # rounding the experts changes the model
        assert row["qat_int4_vs_rtn_pct"] == pytest.approx(100 * (row["qat_int4"] / row["rtn_int4"] - 1))
    runs = {n: read_metrics(tmp_path / "q" / n) for n in ("bf16_s0", "qat_s0", "stage_bf16_s0", "stage_qat_s0")}
    assert [r["tokens"] for r in runs["bf16_s0"]] == [r["tokens"] for r in runs["qat_s0"]] == [32, 64, 96]
    assert runs["stage_bf16_s0"][0]["loss"] == pytest.approx(runs["stage_qat_s0"][0]["loss"], rel=0.02)
    assert json.loads((tmp_path / "q" / "summary.json").read_text()) == s


def test_qat_flag_calls_moonlet_quant_or_fails_clearly(corpus, tmp_path):
    args = ["--model", "tiny", "--data", str(corpus), "--out", str(tmp_path / "q"), "--steps", "1",
            "--seq-len", "16", "--micro-batch", "1", "--no-progress", "--qat", "int4"]
    try:
        from moonlet.quant import enable_qat  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="moonlet.quant.enable_qat"):
            cli_train(args)
    else:
        assert cli_train(args) == 0


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cmd(corpus, out, *extra):
    return ["--model", "tiny", "--data", str(corpus), "--out", str(out), "--seq-len", "32", "--warmup", "3",
            "--lr", "1e-2", "--no-progress", *extra]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_at_the_same_global_batch(corpus, tmp_path):
    single = train(tc(corpus, tmp_path / "one", steps=4, micro_batch=4, grad_accum=1))["losses"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "moonlet.cli", "train", *_cmd(corpus, tmp_path / "two", "--steps", "4", "--micro-batch", "2",
                                              "--grad-accum", "1", "--qk-clip-tau", "0.05")]
    subprocess.run(cmd, check=True, timeout=120, env=_env(), capture_output=True)
    double = [r["loss"] for r in read_metrics(tmp_path / "two")]
    assert double == pytest.approx(single, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_run_resumes(corpus, tmp_path):
    out = tmp_path / "sig"
    proc = subprocess.Popen([sys.executable, "-m", "moonlet.cli", "train", *_cmd(corpus, out, "--steps", "100000")],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not ((out / "metrics.jsonl").exists()
                                              and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        said = proc.stdout.read().decode()
        assert f"stopped by signal {int(signal.SIGTERM)}" in said and f"--out {out} --resume" in said
    finally:
        proc.kill()
    ckpt = latest_checkpoint(out)
    step = int(ckpt.name.split("_")[1])
    assert step == len(read_metrics(out)) >= 2
    assert cli_train(_cmd(corpus, out, "--steps", str(step + 1), "--resume")) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 2))


def test_bench_train_times_muonclip_and_adamw_against_hf_on_the_same_config():
    from moonlet.train_bench import bench_train

    out = bench_train("tiny", batch=2, seq_len=16, steps=1, warmup=1, compare_hf=True)
    assert set(out["moonlet"]) == {"muon", "adamw"} and out["hf"]["amp"]["optimizer"] == "adamw"
    assert set(out["hf"]) == ({"amp", "bf16"} if torch.cuda.is_available() else {"amp"})
    hf_best = min(r["step_s"] for r in out["hf"].values())
    for name, r in out["moonlet"].items():
        assert r["tokens_per_s"] == pytest.approx(32 / r["step_s"], rel=0.01)
        assert out["speedup_vs_hf"][name] == pytest.approx(hf_best / r["step_s"], rel=0.01)
    assert out["newton_schulz_flops_per_step"] > 0
    assert out["train_flops_per_token"] > 0 and out["peak_flops"] is None  # no MFU without a known peak


def test_bench_train_rejects_an_unknown_optimizer_before_building_anything(capsys):
    from moonlet.train_bench import cli_bench_train

    with pytest.raises(SystemExit) as e:
        cli_bench_train(["--preset", "tiny", "--optimizer", "muon,sgd"])
    assert e.value.code == 2 and "unknown ['sgd']" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_training_learns_and_reports_mfu(corpus, tmp_path):
    """`moonlet train` on a GPU: bf16 autocast over fp32 master weights, grouped_mm experts, the Triton max-logit
    kernel and QK-Clip all in one run."""
    losses = train(tc(corpus, tmp_path / "gpu", steps=12, grad_accum=1, qk_clip_tau=100.0))["losses"]
    assert all(map(math.isfinite, losses)) and sum(losses[-3:]) / 3 < losses[0] - 0.5
    rec = read_metrics(tmp_path / "gpu")[-1]
    assert rec["max_logit"] > 0 and rec["tokens_per_s"] > 0
    if any(gpu in torch.cuda.get_device_name() for gpu in ("H100", "H200")):  # a known peak: MFU is reported
        assert 0 < rec["mfu"] < 1


def _cli(corpus, out, *extra):
    return ["--model", "tiny", "--data", str(corpus), "--out", str(out), "--seq-len", "16", "--micro-batch", "2",
            "--warmup", "1", "--no-progress", "--threads", "1", *extra]


def test_the_last_line_gives_the_loss_and_the_eval_loss(corpus, tmp_path, capsys):
    assert cli_train(_cli(corpus, tmp_path / "e", "--steps", "2", "--eval-every", "1")) == 0
    assert re.fullmatch(r"done: step 2, loss \d+\.\d{4}, eval loss \d+\.\d{4}",
                        capsys.readouterr().out.strip().splitlines()[-1])


def test_a_resume_takes_the_saved_options_and_refuses_ones_that_change_the_run(corpus, tmp_path, capsys):
    run = tmp_path / "r"
    assert cli_train(_cli(corpus, run, "--steps", "3", "--stop-at", "1", "--seed", "3", "--qat", "int4")) == 0
    assert cli_train(["--out", str(run), "--resume", "--no-progress", "--stop-at", "2"]) == 0  # all from the run
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["qat"], saved["seed"], saved["seq_len"], saved["steps"]) == ("int4", 3, 16, 3)
    capsys.readouterr()
    assert cli_train(_cli(corpus, run, "--steps", "3", "--seq-len", "32", "--model", "nano", "--optimizer",
                          "adamw")) == 2
    err = capsys.readouterr().err
    assert "--model: saved 'tiny', given 'nano'" in err and "--seq-len: saved 16, given 32" in err
    assert "--optimizer: saved 'muon', given 'adamw'" in err and "another --out" in err and "Traceback" not in err
    assert latest_checkpoint(run).name == "step_0000002"  # nothing was touched
    assert cli_train(["--out", str(run), "--no-progress", "--steps", "4", "--keep", "1"]) == 0  # automatic resume
    err = capsys.readouterr().err
    assert "steps 3 -> 4" in err and latest_checkpoint(run).name == "step_0000004"
    assert "stop_at" not in err  # it belongs to the invocation that stopped: not a change of the run


def test_a_resume_with_another_lr_trains_at_that_lr(corpus, tmp_path):
    """The optimizer state holds the saved groups' lr and weight decay; a retuned resume must not get them back."""
    train(tc(corpus, tmp_path / "r", steps=4, stop_at=2, grad_accum=1, lr=1e-3, warmup=0, schedule="constant"))
    train(tc(corpus, tmp_path / "r", steps=4, grad_accum=1, lr=5e-4, warmup=0, schedule="constant"))
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [1e-3, 1e-3, 5e-4, 5e-4]


def test_a_fine_tune_resumes_without_its_init_checkpoint(corpus, tmp_path):
    import shutil

    train(tc(corpus, tmp_path / "base", steps=1, grad_accum=1))
    init = tmp_path / "init"
    shutil.copytree(tmp_path / "base/checkpoints/step_0000001", init)
    train(tc(corpus, tmp_path / "sft", steps=2, stop_at=1, grad_accum=1, init=str(init)))
    shutil.rmtree(init)  # moved or deleted since: the run's own checkpoint is all a resume needs
    assert train(tc(corpus, tmp_path / "sft", steps=2, grad_accum=1, init=str(init)))["step"] == 2


def test_train_refuses_to_resume_a_qat_run_without_qat(corpus, tmp_path):
    from moonlet.runs import ResumeError

    train(tc(corpus, tmp_path / "q", steps=2, stop_at=1, qat="int4", grad_accum=1))
    with pytest.raises(ResumeError, match="--qat: saved 'int4', given None"):
        train(tc(corpus, tmp_path / "q", steps=2, grad_accum=1))


def test_an_experiment_retrains_a_sub_run_whose_config_changed(corpus, tmp_path, capsys):
    from moonlet.train_reports import fresh_unless_same

    done = tc(corpus, tmp_path / "arm", steps=2, grad_accum=1)
    train(done)
    assert fresh_unless_same(done, "arm") is True  # the same config: reused
    assert fresh_unless_same(TrainConfig(**{**vars(done), "lr": 1e-3}), "arm") is False
    assert "retraining arm (lr 0.01 -> 0.001)" in capsys.readouterr().err and not (tmp_path / "arm").exists()


def test_init_from_an_int4_checkpoint_trains_dequantized_experts_and_qat_applies(corpus, tmp_path):
    from moonlet import checkpoint
    from moonlet.quant import Int4Experts, quantize_checkpoint

    train(tc(corpus, tmp_path / "base", steps=1, grad_accum=1))
    quantize_checkpoint(tmp_path / "base/checkpoints/step_0000001", tmp_path / "int4")
    train(tc(corpus, tmp_path / "sft", steps=2, grad_accum=1, init=str(tmp_path / "int4"), qat="int4"))
    before = checkpoint.load(tmp_path / "int4").moe_layers()[0].experts
    after_dir = tmp_path / "sft/checkpoints/step_0000002"
    after = checkpoint.load(after_dir).moe_layers()[0].experts
    assert isinstance(before, Int4Experts) and not isinstance(after, Int4Experts)  # a plain checkpoint
    assert "quantization_config" not in json.loads((after_dir / "config.json").read_text())
    assert not torch.equal(before.dequantized("gate_proj", torch.float32), after.gate_proj)  # the experts trained


@pytest.mark.parametrize("args,message", [
    (["--model", "nosuchpreset"], "'nosuchpreset' is neither a checkpoint directory nor a preset"),
    (["--model", "nosuch.json"], "nosuch.json: no such config file"),
    (["--init", "runs/nope"], "'runs/nope' is neither a checkpoint directory nor a preset"),
])
def test_config_and_checkpoint_errors_are_one_line(corpus, tmp_path, capsys, args, message):
    assert cli_train(_cli(corpus, tmp_path / "r", "--steps", "1", *args)) == 2
    assert message in capsys.readouterr().err


def test_a_wrong_model_is_reported_before_the_data_is_read(tmp_path, capsys):
    no_data = ["--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "r"), "--steps", "1"]
    assert cli_train(["--model", "nosuchpreset", *no_data]) == 2
    assert cli_train(["--init", str(tmp_path / "nope"), *no_data]) == 2
    err = capsys.readouterr().err
    assert "'nosuchpreset' is neither" in err and "nope' is neither" in err and "meta.json" not in err


def _config(tmp_path, **changes) -> str:
    from moonlet.config import ModelConfig

    cfg = {**ModelConfig.from_preset("tiny").to_hf(), **changes}
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    return str(tmp_path / "m.json")


def test_a_config_json_with_a_wrong_type_is_reported_not_raised(corpus, tmp_path, capsys):
    assert cli_train(_cli(corpus, tmp_path / "r", "--steps", "1", "--model", _config(tmp_path, num_hidden_layers="2"))) == 2
    assert "ModelConfig.num_hidden_layers = '2': must be an int" in capsys.readouterr().err


def test_data_beyond_the_models_vocabulary_or_positions_is_refused_before_training(corpus, tmp_path, capsys):
    small_vocab = _config(tmp_path, vocab_size=1000, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    assert cli_train(_cli(corpus, tmp_path / "v", "--steps", "1", "--model", small_vocab)) == 2
    assert "token ids go up to 32767" in capsys.readouterr().err
    assert cli_train(_cli(corpus, tmp_path / "p", "--steps", "1", "--model",
                          _config(tmp_path, max_position_embeddings=8))) == 2
    assert "--seq-len 16 exceeds the model's max_position_embeddings 8" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() and not (tmp_path / "p").exists()


def test_checkpoints_carry_the_tokenizer_the_data_was_prepared_with(tmp_path):
    from moonlet.config import ModelConfig
    from moonlet.tokenizer import load_tokenizer, train_bpe

    (tmp_path / "a.txt").write_text(TEXT * 3)
    train_bpe([tmp_path / "a.txt"], 600).save(tmp_path / "tok")
    data.prepare(tmp_path / "a.txt", tmp_path / "d", val_every=0, tokenizer_path=str(tmp_path / "tok"))
    ModelConfig.from_preset("tiny").with_(vocab_size=600).save(tmp_path / "m")
    train(tc(tmp_path / "d", tmp_path / "r", model=str(tmp_path / "m"), steps=1, grad_accum=1))
    tok = load_tokenizer(tmp_path / "r/checkpoints/step_0000001")
    assert tok.vocab_size == 600 and tok.encode(TEXT) == load_tokenizer(tmp_path / "tok").encode(TEXT)


def test_a_torn_last_metrics_line_is_dropped_by_resume_and_plot(corpus, tmp_path, capsys):
    from moonlet.train_reports import cli_plot

    run = tmp_path / "r"
    train(tc(corpus, run, steps=3, stop_at=2, grad_accum=1))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 9.1, "lr"')
    assert cli_plot([str(run)]) == 0
    assert "dropping a torn last line" in capsys.readouterr().err
    train(tc(corpus, run, steps=3, grad_accum=1))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_plot_of_one_run_draws_the_tau_line(corpus, tmp_path):
    from moonlet.train_reports import cli_plot

    train(tc(corpus, tmp_path / "r", steps=2, grad_accum=1))
    assert cli_plot([str(tmp_path / "r")]) == 0
    plain = (tmp_path / "r/max_logits.png").read_bytes()
    assert cli_plot([str(tmp_path / "r"), "--tau", "0.5"]) == 0
    assert (tmp_path / "r/max_logits.png").read_bytes() != plain


@pytest.mark.parametrize("option,value,message", [
    ("--micro-batch", "0", "must be >= 1"), ("--seq-len", "-5", "must be >= 1"), ("--grad-accum", "0", ">= 1"),
    ("--threads", "-1", ">= 1"), ("--stop-at", "0", ">= 1"), ("--steps", "-3", ">= 1"), ("--warmup", "-2", ">= 0"),
    ("--eval-every", "-1", ">= 0"), ("--save-every", "-1", ">= 0"), ("--eval-batches", "0", ">= 1"),
    ("--lr", "nan", "finite number > 0"), ("--lr", "-1", "> 0"), ("--qk-clip-tau", "-1", "> 0"),
    ("--decay-frac", "1.5", ">= 0 and <= 1"), ("--decay-frac", "-1", ">= 0 and <= 1"), ("--seq-len", "x", "integer"),
])
def test_numeric_options_outside_their_range_are_usage_errors(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as e:
        cli_train(["--out", str(tmp_path / "r"), option, value])
    assert e.value.code == 2 and f"argument {option}: " in (err := capsys.readouterr().err) and message in err


def test_a_non_finite_loss_stops_training_without_checkpointing_it(corpus, tmp_path):
    from moonlet.train import TrainError

    with pytest.raises(TrainError, match="stopped before updating the weights"):
        train(tc(corpus, tmp_path / "r", optimizer="adamw", lr=1e30, steps=5, grad_accum=1, save_every=1))
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "r"))
    ckpt = latest_checkpoint(tmp_path / "r")
    assert ckpt is None or all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


def test_a_crash_before_the_latest_pointer_is_written_resumes_from_the_newest_complete_checkpoint(corpus, tmp_path):
    run = tmp_path / "r"
    train(tc(corpus, run, steps=4, save_every=2, grad_accum=1))
    pointer = run / "checkpoints/latest"
    pointer.write_text("step_0000002\n")  # killed after step_0000004's rename, before the pointer moved
    assert latest_checkpoint(run).name == "step_0000004"
    pointer.unlink()  # killed before the first pointer write
    assert latest_checkpoint(run).name == "step_0000004"
    train(tc(corpus, run, steps=5, grad_accum=1, keep=1))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]  # resumed, not restarted
    assert latest_checkpoint(run).name == "step_0000005"


def test_pruning_keeps_the_newest_checkpoints_by_step_number_and_never_the_one_just_written(corpus, tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints/step_0000099").mkdir(parents=True)  # a leftover that sorts after, with no train_state.pt
    train(tc(corpus, run, steps=2, save_every=1, keep=1, grad_accum=1))
    assert latest_checkpoint(run).name == "step_0000002"
    assert not (run / "checkpoints/step_0000001").exists()


def test_out_that_is_a_regular_file_is_refused_before_the_model_is_built(corpus, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    assert cli_train(_cli(corpus, tmp_path / "afile", "--steps", "1")) == 2
    assert "--out" in (err := capsys.readouterr().err) and "is a file" in err
    assert (tmp_path / "afile").read_text() == "keep me"
