"""Traces and resume: every step is on disk as it happens, and a run killed at any point (kill -9 included)
resumes with the same tool results and without re-running a finished tool call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moonlet.agent.backends import ScriptedBackend
from moonlet.agent.loop import Agent
from moonlet.agent.tools import tool
from moonlet.agent.trace import Trace, cli_trace, read_trace, replay

ROOT = Path(__file__).resolve().parents[1]

SIDEFX = '''
import os, time
from moonlet.agent.tools import tool

@tool
def append(line: str) -> str:
    """Append a line to the log file named by $SIDEFX_LOG (a side effect the test can count)."""
    time.sleep(float(os.environ.get("SIDEFX_SLEEP", "0")))
    with open(os.environ["SIDEFX_LOG"], "a") as f:
        f.write(line + "\\n")
    return f"appended {line}"
'''


def script(n: int) -> list[dict]:
    """n steps; every third step makes two parallel calls; then the answer."""
    turns = []
    for i in range(n):
        lines = [f"L{i}a", f"L{i}b"] if i % 3 == 0 else [f"L{i}"]
        turns.append({"reasoning_content": f"step {i}", "content": "",
                      "tool_calls": [{"name": "append", "arguments": {"line": x}} for x in lines]})
    return turns + [{"reasoning_content": "all written", "content": "done"}]


def expected_lines(n: int) -> list[str]:
    return sorted(x for i in range(n) for x in ([f"L{i}a", f"L{i}b"] if i % 3 == 0 else [f"L{i}"]))


@pytest.fixture
def sidefx(tmp_path, monkeypatch):
    (tmp_path / "sidefx.py").write_text(SIDEFX)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SIDEFX_LOG", str(tmp_path / "log.txt"))
    sys.modules.pop("sidefx", None)
    import sidefx

    yield sidefx.append, tmp_path / "log.txt"
    sys.modules.pop("sidefx", None)


def log_lines(path: Path) -> list[str]:
    """Sorted: the parallel calls of one turn finish in any order."""
    return sorted(path.read_text().splitlines()) if path.exists() else []


def tool_records(records: list[dict]) -> list[tuple[str, str]]:
    return [(r["tool_call_id"], r["content"]) for r in records if r["type"] == "tool"]


def test_every_step_is_on_disk_before_the_next_starts(tmp_path):
    path = tmp_path / "t.jsonl"
    seen: list[list[str]] = []

    @tool
    def peek(n: int = 0) -> str:
        """Look at the trace file."""
        seen.append([json.loads(x)["type"] for x in path.read_text().splitlines()])
        return "ok"

    be = ScriptedBackend([{"tool_calls": [{"name": "peek", "arguments": {}}]},
                          {"tool_calls": [{"name": "peek", "arguments": {"n": 1}}]}, {"content": "end"}])
    with Trace(path) as tr:
        Agent(be, [peek], trace=tr).run("q")
    assert seen[0] == ["start", "turn"] and seen[1] == ["start", "turn", "tool", "turn"]
    assert [r["type"] for r in read_trace(path)] == ["start", "turn", "tool", "turn", "tool", "turn", "end"]


def test_a_torn_last_line_is_ignored_and_cut_before_appending(tmp_path):
    path = tmp_path / "t.jsonl"
    with Trace(path) as tr:
        Agent(ScriptedBackend([{"content": "a"}]), trace=tr).run("q")
    with open(path, "a") as f:
        f.write('{"type": "turn", "mess')  # the process died mid-write
    assert [r["type"] for r in read_trace(path)] == ["start", "turn", "end"]
    with Trace(path) as tr:
        tr.write({"type": "hide", "ids": []})
    assert [r["type"] for r in read_trace(path)] == ["start", "turn", "end", "hide"]
    path.write_text('{"type": "start", "messages": []}\nnot json\n{"type": "end"}\n')
    with pytest.raises(ValueError, match="t.jsonl:2"):
        read_trace(path)
    path.write_text('{"type": "start", "messages": []}\n')
    with open(path, "ab") as f:  # records are UTF-8: a tear can split a character
        f.write('{"type": "turn", "content": "é'.encode()[:-1])
    assert [r["type"] for r in read_trace(path)] == ["start"]
    path.write_text('[{"content": "a scripted turn file, not a trace"}]\n')
    with pytest.raises(ValueError, match="record 1 is not a trace record"):
        read_trace(path)


def test_an_interrupted_run_resumes_from_its_trace_without_rerunning_tools(tmp_path, sidefx):
    append, log = sidefx
    path = tmp_path / "t.jsonl"
    turns = script(6)

    def interrupting(messages, tools, **kw):
        i = sum(m["role"] == "assistant" for m in messages)
        if i == 4:
            raise KeyboardInterrupt  # Ctrl-C while the model generates step 5
        return turns[i]

    with Trace(path) as tr:
        r = Agent(ScriptedBackend(interrupting), [append], trace=tr).run("write")
    assert r.stop_reason == "interrupted" and log_lines(log) == expected_lines(4)
    with Trace(path) as tr:
        r2 = Agent(ScriptedBackend(turns), [append], trace=tr).run(resume=replay(read_trace(path)))
    assert (r2.stop_reason, r2.answer, r2.steps) == ("answer", "done", 7)
    assert log_lines(log) == expected_lines(6)
    ids = [i for i, _ in tool_records(read_trace(path))]
    assert len(ids) == len(set(ids)) == len(expected_lines(6))


def test_resume_runs_only_the_calls_of_the_last_turn_that_have_no_result(tmp_path, sidefx):
    append, log = sidefx
    path = tmp_path / "t.jsonl"
    with Trace(path) as tr:
        Agent(ScriptedBackend(script(4)), [append], trace=tr).run("write")
    full = read_trace(path)
    reference = tool_records(full)
    # the state of a crash in the last parallel turn (step 4: L3a, L3b) after L3a finished, before L3b did
    last_tool = max(i for i, r in enumerate(full) if r["type"] == "tool")
    cut = [r for r in full[:last_tool + 1] if r.get("content") != "appended L3b"]
    path.write_text("".join(json.dumps(r) + "\n" for r in cut))
    log.write_text("".join(x + "\n" for x in expected_lines(4) if x != "L3b"))  # L3b never ran
    with Trace(path) as tr:
        r = Agent(ScriptedBackend(script(4)), [append], trace=tr).run(resume=replay(read_trace(path)))
    assert r.answer == "done" and log_lines(log) == expected_lines(4)
    assert sorted(tool_records(read_trace(path))) == sorted(reference)


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "moonlet.cli", "agent", *args]


def test_the_agent_command_runs_a_scripted_trajectory_and_prints_json(tmp_path, sidefx):
    _, log = sidefx
    (tmp_path / "s.json").write_text(json.dumps(script(2)))
    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    p = subprocess.run(agent_cmd("write lines", "--scripted", str(tmp_path / "s.json"), "--tools", "sidefx:append",
                                 "--trace", str(tmp_path / "t.jsonl"), "--json"),
                       capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert (out["answer"], out["stop_reason"], out["steps"]) == ("done", "answer", 3)
    assert "→ append" in p.stdout and "appended L0a" in p.stdout  # the live view
    assert log_lines(log) == expected_lines(2)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_with_the_same_results_and_no_repeated_calls(tmp_path, sidefx):
    append, log = sidefx
    n = 12
    (tmp_path / "s.json").write_text(json.dumps(script(n)))
    # the uninterrupted reference, in process
    with Trace(tmp_path / "ref.jsonl") as tr:
        Agent(ScriptedBackend.from_file(tmp_path / "s.json"), [append], trace=tr).run("write lines")
    reference = tool_records(read_trace(tmp_path / "ref.jsonl"))
    log.unlink()

    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "SIDEFX_SLEEP": "0.1"}
    trace = tmp_path / "t.jsonl"
    proc = subprocess.Popen(agent_cmd("write lines", "--scripted", str(tmp_path / "s.json"), "--tools",
                                      "sidefx:append", "--trace", str(trace), "--quiet"),
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(log_lines(log)) < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = read_trace(trace)
    done_before = {c for c, _ in tool_records(before)}
    assert 0 < len(done_before) < len(reference) and before[-1]["type"] != "end"

    p = subprocess.run(agent_cmd("--resume", str(trace), "--quiet", "--json"), env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["answer"] == "done"
    after = read_trace(trace)
    assert sorted(tool_records(after)) == sorted(reference)  # same ids, same results, each recorded once
    lines = log_lines(log)
    assert sorted(set(lines)) == sorted(expected_lines(n))
    content_of = dict(reference)
    for line in set(lines):  # a call finished before the kill was never run again
        cid = next(c for c, v in content_of.items() if v == f"appended {line}")
        assert lines.count(line) == 1 or cid not in done_before


@pytest.mark.slow
def test_ctrl_c_in_heavy_mode_records_every_trajectory_as_interrupted_and_resumes(tmp_path, sidefx):
    (tmp_path / "s.json").write_text(json.dumps(script(12)))
    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "SIDEFX_SLEEP": "0.1"}
    trace = tmp_path / "t.jsonl"
    proc = subprocess.Popen(agent_cmd("write lines", "--scripted", str(tmp_path / "s.json"), "--tools",
                                      "sidefx:append", "--heavy", "2", "--trace", str(trace), "--quiet"),
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(log_lines(sidefx[1])) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    ends = {r["traj"]: r["stop_reason"] for r in read_trace(trace) if r["type"] == "end"}
    assert ends == {0: "interrupted", 1: "interrupted"}
    p = subprocess.run(agent_cmd("--resume", str(trace), "--quiet", "--json"), env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["answer"] == "done"


def test_a_trace_that_holds_a_run_is_continued_only_by_resume_and_as_it_was_run(tmp_path, capsys):
    from moonlet.agent.cli import cli_agent
    from moonlet.cli import UsageError

    turns, trace = tmp_path / "s.json", tmp_path / "t.jsonl"
    turns.write_text(json.dumps(script(0)))
    assert cli_agent(["q", "--scripted", str(turns), "--trace", str(trace), "--quiet"]) == 0
    size = trace.stat().st_size
    with pytest.raises(UsageError, match="already holds a run"):  # two runs in one trace could not be resumed
        cli_agent(["q", "--scripted", str(turns), "--trace", str(trace), "--quiet"])
    with pytest.raises(UsageError, match="ran --heavy 1"):
        cli_agent(["--resume", str(trace), "--heavy", "3"])
    assert trace.stat().st_size == size
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"type": "start", "messages": []}) + "\n" + json.dumps({"type": "turn", "step": 1}) + "\n")
    with pytest.raises(UsageError, match="not a trace moonlet can continue"):
        cli_agent(["--resume", str(bad), "--scripted", str(turns)])


def sandboxes() -> set[str]:
    """Running sandboxed scripts, by their command lines (which name their temp dirs)."""
    found = set()
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"moonlet-sbx-" in cmd:
            found.add(cmd.decode(errors="replace"))
    return found


@pytest.mark.slow
def test_ctrl_c_during_a_long_tool_call_exits_at_once_and_kills_the_script(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps([
        {"content": "", "tool_calls": [{"name": "python", "arguments": {"code": "import time; time.sleep(60)"}}]},
        {"content": "never reached"}]))
    trace, before = tmp_path / "t.jsonl", sandboxes()
    proc = subprocess.Popen(agent_cmd("sleep", "--scripted", str(tmp_path / "s.json"), "--tools", "python",
                                      "--yes", "--trace", str(trace), "--quiet"),
                            cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (sandboxes() - before) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandboxes() - before, "the script never started"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 130  # not when the tool ends (its 10 s timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10  # SIGKILL is prompt, but a loaded machine may take a moment to reap
    while sandboxes() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (sandboxes() - before)  # the script's process group went with the agent
    assert [r["stop_reason"] for r in read_trace(trace) if r["type"] == "end"] == ["interrupted"]


def test_trace_show_prints_the_run_readably(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    be = ScriptedBackend([{"reasoning_content": "let me compute", "tool_calls": [{"name": "calculator",
                                                                                 "arguments": {"expression": "6*7"}}]},
                          {"reasoning_content": "got it", "content": "42"}])
    from moonlet.agent.tools import calculator

    with Trace(path) as tr:
        Agent(be, [calculator], trace=tr).run("what is 6*7?")
    assert cli_trace(["show", str(path), "--no-color"]) == 0
    out = capsys.readouterr().out
    for piece in ("what is 6*7?", "step 1", "let me compute", 'calculator({"expression": "6*7"})', "42",
                  "answer after 2 steps"):
        assert piece in out, piece
    assert "\033[" not in out


def test_trace_show_json_summarizes_the_run_and_says_when_it_did_not_finish(tmp_path, capsys):
    from moonlet.agent.tools import calculator

    path = tmp_path / "t.jsonl"
    be = ScriptedBackend([{"reasoning_content": "two at once", "tool_calls": [
                              {"name": "calculator", "arguments": {"expression": "6*7"}},
                              {"name": "calculator", "arguments": {"expression": "1/0"}}]},
                          {"reasoning_content": "got it", "content": "42"}])
    with Trace(path) as tr:
        res = Agent(be, [calculator], trace=tr).run("what is 6*7?")
    assert cli_trace(["show", str(path), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # only the JSON object: pipe it to jq
    s = json.loads(out[0])
    assert (s["finished"], s["stop_reason"], s["answer"], s["steps"]) == (True, "answer", "42", 2)
    assert (s["tool_calls"], s["tool_errors"]) == (2, 1)  # 1/0 is an error the model sees
    assert s["usage"] == res.usage and s["usage"]["completion_tokens"] > 0 and s["trace"] == str(path)
    records = read_trace(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records if r["type"] != "end"))  # killed before the end
    assert cli_trace(["show", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["finished"], s["stop_reason"], s["answer"], s["steps"], s["tool_calls"]) == (False, None, None, 2, 2)
    assert cli_trace(["show", str(path), "--json", "--traj", "3"]) == 2
    assert "no start record for trajectory 3" in capsys.readouterr().err
    path.write_text(json.dumps(records[0]) + "\n" + json.dumps({"type": "turn", "step": 1}) + "\n")
    assert cli_trace(["show", str(path), "--json"]) == 2
    assert "a malformed record (KeyError 'message')" in capsys.readouterr().err
