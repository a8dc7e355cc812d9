"""The `moonlet` command: every subcommand explains itself with --help, unknown commands fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moonlet.bench import BENCHES
from moonlet.cli import COMMANDS, main


def run_help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None), f"{argv} exited {exit_info.value.code}"
    return capsys.readouterr().out


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "bench"])
def test_every_subcommand_has_help(name, capsys):
    out = run_help([name, "--help"], capsys)
    assert f"moonlet {name}" in out and len(out.splitlines()) >= 3


@pytest.mark.parametrize("name", list(BENCHES))
def test_every_benchmark_has_help(name, capsys):
    out = run_help(["bench", name, "--help"], capsys)
    assert "--json" in out


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_a_training_run_directory_means_its_newest_complete_checkpoint(tmp_path, capsys):
    import os

    import moonlet
    from moonlet.checkpoint import model_dir

    run, model = tmp_path / "run", moonlet.load("tiny", seed=3)
    for step in (2, 10, 11):
        moonlet.save(model, run / "checkpoints" / f"step_{step:07d}")
        if step != 11:  # step 11: a save cut short (no train state)
            (run / "checkpoints" / f"step_{step:07d}" / "train_state.pt").write_bytes(b"")
    newest = str(run / "checkpoints" / "step_0000010")
    assert model_dir(run) == model_dir(run / "checkpoints") == newest and model_dir("tiny") == "tiny"
    assert main(["generate", "--model", str(run), "--prompt", "hi", "--max-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["info", str(run), "--json"]) == 0  # the newest checkpoint's config
    assert json.loads(capsys.readouterr().out)["params_total"] == sum(p.numel() for p in model.parameters())
    weights = run / "checkpoints" / "step_0000010" / "model.safetensors"
    assert os.stat(weights).st_mode & 0o044 == 0o044 & ~os.umask(os.umask(0))  # readable as umask allows
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 1
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err


def test_a_reader_that_leaves_early_is_not_a_traceback():
    """`moonlet info kimi-k2 | head`: here the reader closes the pipe before moonlet writes a byte."""
    p = subprocess.run(f"{sys.executable} -m moonlet.cli info kimi-k2 | (exec 0<&-; sleep 5)", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_unknown_command_is_an_error_with_usage(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_info_json_for_kimi_k2_from_the_console_script():
    out = subprocess.run([sys.executable, "-m", "moonlet.cli", "info", "kimi-k2", "--json"], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert 1.02e12 < report["params_total"] < 1.04e12
    assert 32e9 < report["params_active"] < 33e9
    assert report["kv_bytes_per_token_bf16"] == 70272
    assert round(report["checkpoint_bytes_int4_experts"] / 1e9) == 594
    assert report["max_position_embeddings"] == 262144  # 4096 x YaRN factor 64


def test_info_says_when_the_flops_context_is_beyond_the_models(capsys):
    assert main(["info", "moonlight-16b-a3b", "--context", "300000"]) == 0
    assert "at context 300,000, beyond the model's context" in capsys.readouterr().out
    assert main(["info", "moonlight-16b-a3b", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "context (max positions)    8,192 tokens" in out and "beyond" not in out


def test_bad_input_is_one_line_on_stderr_and_exit_1_not_a_traceback(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")  # a config and no weights
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 1
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "neither a checkpoint directory nor a preset" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2


@pytest.mark.parametrize("argv, says", [
    (["generate", "--model", "tiny", "--prompt", "hi", "--device", "nodevice"], "moonlet generate: --device 'nodevice': "),
    (["bench", "decode", "--model", "tiny", "--dtype", "fp8"], "moonlet bench: --dtype 'fp8': choose one of fp32,"),
    (["agent", "hi"], "moonlet agent: give --model (local) or --base-url (an endpoint)"),
    (["agent", "hi", "--scripted", "x.json", "--base-url", "http://127.0.0.1:9/v1"],
     "moonlet agent: give only one of --scripted, --base-url"),
    (["eval", "multihop", "--model", "tiny", "--sweep", "depth=1,2"], "moonlet eval: --sweep dial 'depth' unknown"),
])
def test_options_that_do_not_fit_together_are_one_line_naming_the_command(argv, says, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(says) and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv", [["--max-tokens", "0"], ["--temperature", "-1"], ["--stop="], ["--threads", "0"],
                                  ["--seed", "99999999999999999999999"], ["--seed", "-1"]])
def test_generate_refuses_bad_options_before_loading_the_model(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "tiny", "--prompt", "hi", *argv])
    assert e.value.code not in (0, None) and "Traceback" not in capsys.readouterr().err


def test_generate_exits_1_and_reports_the_error_when_the_engine_fails(monkeypatch, capsys):
    from moonlet import model

    def broken(self, x):  # an injected fault: a valid model cannot be made to fail its forward on demand
        raise RuntimeError("injected router fault")

    monkeypatch.setattr(model.Router, "forward", broken)
    code = main(["generate", "--model", "tiny", "--prompt", "hi", "--max-tokens", "2", "--json"])
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and result["finish_reason"] == "error" and "injected router fault" in result["error"]
    assert "the engine failed" in err


def test_info_memory_reports_the_cache_tokens_that_fit_and_one_sequences_limit(capsys):
    assert main(["info", "kimi-k2", "--memory", "1.5TB", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)["context_tokens_that_fit"]
    assert fit["bf16_weights"] == 0 < fit["int4_expert_weights"] < fit["cache_only"]  # 2 TB of bf16 does not fit
    assert fit["one_sequence_at_most"] == 262144
    for bad in (["--memory", "lots"], ["--memory", "infGB"], ["--memory", "-1GB"], ["--context", "-1"]):
        with pytest.raises(SystemExit):
            main(["info", "tiny", *bad])
    assert "is not a size" in capsys.readouterr().err


def test_serve_on_a_taken_port_says_so_and_exits_cleanly():
    """A port in use is the common mistake: one line naming the address, exit 1, and the engine thread
    stopped (before, the interpreter aborted with "terminate called without an active exception")."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "moonlet.cli", "serve", "--model", "tiny", "--port", str(port)],
                           capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip() == f"moonlet serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    bad = subprocess.run([sys.executable, "-m", "moonlet.cli", "serve", "--model", "tiny", "--port", "70000"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "argument --port: must be <= 65535, got 70000" in bad.stderr


@pytest.mark.parametrize("argv", [["agent", "hi", "--model", "tiny", "--tools", "nosuch"],
                                  ["eval", "multihop", "--model", "tiny", "--n", "1", "--max-tokens", "40000"]])
def test_an_error_after_the_engine_started_exits_with_its_message_not_an_abort(argv):
    """The engine's loop thread is stopped at exit, so a usage error found once the model is loaded is still
    exit 1 and one line (not SIGABRT from torch torn down under a running thread)."""
    p = subprocess.run([sys.executable, "-m", "moonlet.cli", *argv], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--tools: unknown tool 'nosuch'" in p.stderr or "--max-tokens 40000 leaves no room" in p.stderr
