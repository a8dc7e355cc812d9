"""The think/act loop, driven by a ScriptedBackend that replays trajectories (it proves the loop, not a model),
with real moonlet Tools."""

from __future__ import annotations

import json
import threading
import time

import pytest

from moonlet.agent.backends import ScriptedBackend, Turn, to_openai_messages, turn_from_openai
from moonlet.agent.loop import Agent, Budget
from moonlet.agent.tools import ToolError, calculator, tool


def call(name: str, args, id: str | None = None) -> dict:
    c = {"type": "function", "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
    if id is not None:
        c["id"] = id
    return c


def turn(*calls, reasoning: str = "", content: str = "") -> dict:
    return {"reasoning_content": reasoning, "content": content, "tool_calls": list(calls)}


def tool_results(messages: list[dict]) -> dict[str, str]:
    return {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}


@tool
def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


def test_a_turn_without_tool_calls_is_the_final_answer():
    r = Agent(ScriptedBackend([turn(reasoning="easy", content="4")]), [calculator]).run("2+2?")
    assert (r.answer, r.stop_reason, r.steps, r.tool_calls) == ("4", "answer", 1, 0)


def test_tool_results_are_appended_with_their_ids_and_the_loop_continues():
    be = ScriptedBackend([turn(call("calculator", {"expression": "6*7"})), turn(content="42")])
    r = Agent(be, [calculator]).run("6*7?")
    assert r.answer == "42" and r.steps == 2 and r.tool_calls == 1
    asst, result = r.messages[1], r.messages[2]
    assert result == {"role": "tool", "tool_call_id": asst["tool_calls"][0]["id"], "content": "42"}
    assert asst["tool_calls"][0]["id"] == "functions.calculator:0"  # K2-style id assigned when missing
    assert be.calls[1]["messages"][-1]["content"] == "42"  # the model saw the result


def test_live_episode_reasoning_is_sent_back_verbatim_including_empty_strings():
    be = ScriptedBackend([turn(call("add", {"a": 1, "b": 2}), reasoning=""),
                          turn(call("add", {"a": 3, "b": 4}), reasoning="  spaces\nkept  "),
                          turn(content="done", reasoning="final")])
    Agent(be, [add]).run("q")
    sent = [m for m in be.calls[2]["messages"] if m["role"] == "assistant"]
    assert [m["reasoning_content"] for m in sent] == ["", "  spaces\nkept  "]
    api = [m for m in to_openai_messages(be.calls[2]["messages"]) if m["role"] == "assistant"]
    assert [m["reasoning_content"] for m in api] == ["", "  spaces\nkept  "]


def test_parallel_calls_of_one_turn_run_concurrently_and_results_keep_call_order():
    barrier = threading.Barrier(3, timeout=10)  # passes only if all three calls are running at once
    finished: list[int] = []

    @tool
    def wait(i: int) -> str:
        """Wait for the other calls."""
        barrier.wait()
        time.sleep(0.15 * (3 - i))  # finish in reverse order (gaps a loaded machine's scheduling cannot swap)
        finished.append(i)
        return f"r{i}"

    be = ScriptedBackend([turn(*(call("wait", {"i": i}, id=f"c{i}") for i in range(3))), turn(content="ok")])
    r = Agent(be, [wait]).run("q")
    assert finished == [2, 1, 0]
    assert [(m["tool_call_id"], m["content"]) for m in r.messages if m["role"] == "tool"] == \
        [("c0", "r0"), ("c1", "r1"), ("c2", "r2")]


def test_malformed_calls_are_answered_as_tool_errors_and_the_run_goes_on():
    be = ScriptedBackend([turn(call("add", '{"a": 1, "b":'), call("nope", {}), call("add", {"a": "x", "b": 2}),
                               call("add", {"a": 1}), call("add", {"a": 1, "b": 2, "c": 3}),
                               call("add", "[1, 2]"), call("add", {"a": 2, "b": 2})),
                          turn(content="survived")])
    r = Agent(be, [add, calculator]).run("q")
    assert r.stop_reason == "answer" and r.answer == "survived"
    res = list(tool_results(r.messages).values())
    assert "not valid JSON" in res[0]
    assert "unknown tool 'nope'" in res[1] and "add, calculator" in res[1]
    assert all(x.startswith("Error") for x in res[:6]) and "invalid arguments" in res[2]
    assert "'b'" in res[3] and "'c'" in res[4] and "JSON object" in res[5]
    assert res[6] == "4"


def test_a_tool_that_raises_is_reported_to_the_model_not_raised():
    @tool
    def boom(x: int) -> str:
        """Fails."""
        raise RuntimeError("disk on fire")

    class Bare:  # a duck-typed tool outside @tool, raising ToolError itself
        name, description, needs_approval = "bare", "", False
        parameters = {"type": "object", "properties": {}}

        def spec(self):
            return {"type": "function", "function": {"name": self.name, "parameters": self.parameters}}

        def __call__(self, arguments):
            raise ToolError("nothing here")

    be = ScriptedBackend([turn(call("boom", {"x": 1}), call("bare", {})), turn(content="ok")])
    res = list(tool_results(Agent(be, [boom, Bare()]).run("q").messages).values())
    assert "disk on fire" in res[0] and res[0].startswith("Error")
    assert res[1] == "Error: nothing here"


def test_repeated_identical_calls_are_warned_then_refused_then_the_run_stops():
    same = lambda: call("add", {"b": 2, "a": 1})  # key order does not make calls different
    be = ScriptedBackend([turn(same()) for _ in range(10)] + [turn(content="never")])
    r = Agent(be, [add], repeat_limit=3).run("q")
    res = list(tool_results(r.messages).values())
    assert res[0] == "3"
    assert res[1].startswith("Warning") and res[1].endswith("3") and "1 time" in res[1]
    assert res[2].startswith("Warning") and "2 time" in res[2]
    assert res[3].startswith("Error: refused") and "limit is 3" in res[3]
    assert r.stop_reason == "repeated_calls" and r.steps == 5 and len(res) == 5


def test_identical_calls_in_one_turn_are_refused_but_do_not_stop_a_model_that_never_saw_a_refusal():
    same = lambda: call("add", {"a": 2, "b": 2})
    r = Agent(ScriptedBackend([turn(*[same() for _ in range(5)]), turn(content="4")]), [add], repeat_limit=3).run("q")
    res = list(tool_results(r.messages).values())
    assert (r.stop_reason, r.answer, r.steps) == ("answer", "4", 2)
    assert [x.startswith("Error: refused") for x in res] == [False, False, False, True, True]


def test_an_empty_final_answer_is_not_replaced_by_interim_text():
    be = ScriptedBackend([{"content": "Let me compute", "tool_calls": [call("add", {"a": 1, "b": 1})]},
                          {"reasoning_content": "hmm", "content": ""}])
    r = Agent(be, [add]).run("q")
    assert (r.stop_reason, r.answer) == ("empty", "")  # told apart from an answer, for --json and heavy's vote
    budget_ended = Agent(ScriptedBackend([{"content": "Let me compute", "tool_calls": [call("add", {"a": 1, "b": 1})]}]),
                         [add], budget=Budget(max_steps=1)).run("q")
    assert (budget_ended.stop_reason, budget_ended.answer) == ("max_steps", "Let me compute")  # the best there is


def test_a_turn_ending_in_error_says_so():
    r = Agent(ScriptedBackend([{"content": "", "finish_reason": "error"}]), []).run("q")
    assert r.stop_reason == "error" and "finish_reason 'error'" in r.error


def test_a_resumed_turn_sends_its_results_in_call_order():
    """The crash left call :1's result; :0 runs on resume, and the model sees :0 then :1, as it would have."""
    calls = [call("add", {"a": 1, "b": 1}, id="functions.add:0"), call("add", {"a": 2, "b": 2}, id="functions.add:1")]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "functions.add:1", "content": "4"}]
    be = ScriptedBackend([turn(content="done")])
    Agent(be, [add]).run(messages=messages)
    sent = [m.get("tool_call_id") for m in be.calls[0]["messages"] if m["role"] == "tool"]
    assert sent == ["functions.add:0", "functions.add:1"]


def test_different_arguments_are_not_repeats():
    be = ScriptedBackend([turn(call("add", {"a": i, "b": 1})) for i in range(6)] + [turn(content="7")])
    r = Agent(be, [add], repeat_limit=1).run("q")
    assert r.stop_reason == "answer" and not any("Warning" in c for c in tool_results(r.messages).values())


def test_missing_or_duplicate_call_ids_are_replaced_by_unique_k2_ids():
    be = ScriptedBackend([turn(call("add", {"a": 1, "b": 1}, id="x"), call("add", {"a": 2, "b": 2}, id="x")),
                          turn(call("add", {"a": 3, "b": 3}, id="x")), turn(content="ok")])
    r = Agent(be, [add]).run("q")
    ids = [c["id"] for m in r.messages if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    assert ids[0] == "x" and len(set(ids)) == 3 and all(i == "x" or i.startswith("functions.add:") for i in ids)
    assert list(tool_results(r.messages)) == ids


@pytest.mark.parametrize("budget, reason", [
    (Budget(max_steps=3), "max_steps"),
    (Budget(max_total_tokens=1), "max_total_tokens"),
    (Budget(max_cost=0.001, price_input=1000.0), "max_cost"),
    (Budget(max_wall_s=0.0), "max_wall_s"),
])
def test_budgets_stop_the_run(budget, reason):
    be = ScriptedBackend([turn(call("add", {"a": i, "b": 0})) for i in range(10)])
    r = Agent(be, [add], budget=budget).run("q")
    assert r.stop_reason == reason
    assert r.steps == {"max_steps": 3, "max_wall_s": 0}.get(reason, 1)


def test_cost_uses_the_per_million_prices_with_cached_tokens_discounted():
    usage = {"prompt_tokens": 1_000_000, "cached_tokens": 400_000, "completion_tokens": 200_000, "reasoning_tokens": 0}
    be = ScriptedBackend([{**turn(content="a"), "usage": usage}])
    r = Agent(be, budget=Budget(price_input=0.60, price_output=2.50, price_cached=0.15)).run("q")
    assert r.cost == pytest.approx(0.6 * 0.6 + 0.4 * 0.15 + 0.2 * 2.5)


def test_reasoning_budget_and_token_limits_reach_the_backend():
    be = ScriptedBackend([turn(content="a")])
    Agent(be, budget=Budget(max_tokens_per_step=777, max_thinking_tokens=55), temperature=0.3, seed=9).run("q")
    assert {k: be.calls[0][k] for k in ("max_tokens", "max_thinking_tokens", "temperature", "seed")} == \
        {"max_tokens": 777, "max_thinking_tokens": 55, "temperature": 0.3, "seed": 9}


def test_tools_needing_approval_are_run_rejected_or_rejected_with_feedback():
    ran: list[str] = []

    @tool(needs_approval=True)
    def rm(path: str) -> str:
        """Delete a file."""
        ran.append(path)
        return "deleted"

    verdicts = {"a": True, "b": False, "c": "use the trash instead"}
    be = ScriptedBackend([turn(*(call("rm", {"path": p}) for p in "abc")), turn(content="ok")])
    r = Agent(be, [rm], approve=lambda c, t: verdicts[json.loads(c["function"]["arguments"])["path"]]).run("q")
    res = list(tool_results(r.messages).values())
    assert ran == ["a"] and res[0] == "deleted"
    assert "rejected" in res[1] and "rejected" in res[2] and "use the trash instead" in res[2]
    be = ScriptedBackend([turn(call("rm", {"path": "d"})), turn(content="ok")])
    res = list(tool_results(Agent(be, [rm]).run("q").messages).values())  # no approver: never run
    assert ran == ["a"] and "rejected" in res[0]


def test_ctrl_c_during_generation_stops_cleanly_with_an_end_record():
    records: list[dict] = []

    def script(messages, tools, **kw):
        if sum(m["role"] == "assistant" for m in messages) == 2:
            raise KeyboardInterrupt
        return turn(call("add", {"a": len(messages), "b": 0}))

    r = Agent(ScriptedBackend(script), [add], on_record=records.append).run("q")
    assert r.stop_reason == "interrupted" and r.steps == 2
    assert [x["type"] for x in records] == ["start", "turn", "tool", "turn", "tool", "end"]


def test_openai_messages_keep_reasoning_and_calls_and_drop_unknown_keys():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            Turn("", "", [call("add", {"a": 1}, id="functions.add:0")]).to_message(),
            {"role": "tool", "tool_call_id": "functions.add:0", "content": "1", "extra": 1}]
    out = to_openai_messages(msgs)
    assert out[2] == {"role": "assistant", "content": "", "reasoning_content": "",
                      "tool_calls": [{"id": "functions.add:0", "type": "function",
                                      "function": {"name": "add", "arguments": '{"a": 1}'}}]}
    assert out[3] == {"role": "tool", "tool_call_id": "functions.add:0", "content": "1"}


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_openai_responses_are_read_into_turns_with_reasoning_from_either_field(field):
    from openai.types.chat import ChatCompletion

    c = ChatCompletion.model_validate({
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, field: "let me add",
            "tool_calls": [{"id": "functions.add:0", "type": "function",
                            "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]}}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57,
                  "prompt_tokens_details": {"cached_tokens": 32}, "completion_tokens_details": {"reasoning_tokens": 4}}})
    t = turn_from_openai(c)
    assert (t.reasoning_content, t.content, t.finish_reason) == ("let me add", "", "tool_calls")
    assert t.tool_calls == [{"id": "functions.add:0", "type": "function",
                             "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]
    assert t.usage == {"prompt_tokens": 50, "cached_tokens": 32, "completion_tokens": 7, "reasoning_tokens": 4}


# ------------------------------------------------------------------------------------------------- eval

def test_eval_grades_real_tool_runs_and_reports_accuracy_steps_and_tokens(tmp_path):
    """An oracle policy (scripted: it runs each task's reference program in the real python sandbox, then
    answers with the output, deliberately wrong on odd tasks) proves the eval plumbing, not a model."""
    from moonlet.agent.cli import evaluate
    from moonlet.tasks import make_tasks

    tasks = make_tasks("python", 4, difficulty=1, seed=3, workdir=tmp_path)
    by_question = {t.question: (i, t) for i, t in enumerate(tasks)}

    def oracle(messages, tools, **kw):
        i, task = by_question[messages[-1]["content"] if messages[-1]["role"] == "user" else messages[0]["content"]]
        if messages[-1]["role"] == "user":
            return turn(call("python", {"code": task.meta["program"]}))
        out = messages[-1]["content"].strip().splitlines()[-1]  # after any sandbox note
        return turn(content=out if i % 2 == 0 else out + "1")

    s = evaluate(tasks, ScriptedBackend(oracle), budget=Budget(max_steps=5), concurrency=2,
                 metrics=tmp_path / "m.jsonl", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert (s["n"], s["accuracy"], s["mean_steps"], s["mean_tool_calls"]) == (4, 0.5, 2.0, 1.0), [(r["answer"], r["expected"], r["correct"]) for r in rows]
    assert s["tokens"]["prompt_tokens"] > 0 and s["stop_reasons"] == {"answer": 4}
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert sorted(r["correct"] for r in rows) == [False, False, True, True]


def test_eval_command_prints_a_json_summary_and_draws_a_sweep_png(tmp_path):
    import subprocess
    import sys

    (tmp_path / "s.json").write_text(json.dumps([turn(content="42")]))
    base = [sys.executable, "-m", "moonlet.cli", "eval", "python", "--scripted", str(tmp_path / "s.json"), "--n", "3",
            "--workdir", str(tmp_path), "--json", "--no-progress"]
    p = subprocess.run(base + ["--out", str(tmp_path / "e.jsonl")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout.strip().splitlines()[-1])
    from moonlet.tasks import grade, make_tasks

    tasks = make_tasks("python", 3, difficulty=2, seed=0, workdir=tmp_path)  # the command's defaults
    assert s["n"] == 3 and s["mean_steps"] == 1.0 and s["accuracy"] == sum(grade(t, "42") for t in tasks) / 3
    p = subprocess.run(base + ["--sweep", "steps=1,2;heavy=1,2", "--out", str(tmp_path / "w.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert [pt["value"] for pt in s["sweep"]["steps"]] == [1, 2] and len(s["sweep"]["heavy"]) == 2
    assert open(s["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    runs = [json.loads(x)["run"] for x in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert sorted(set(runs)) == ["heavy=1", "heavy=2", "steps=1", "steps=2"] and len(runs) == 12
    for bad in (["--sweep", "steps="], ["--sweep", ";"], ["--sweep", "steps=0,2"], ["--n", "0"]):
        p = subprocess.run(base + bad, capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "Traceback" not in p.stderr, bad


def test_eval_says_when_tasks_ended_on_errors_and_fails_when_all_did(tmp_path):
    """A backend that only fails scores 0.000 like a wrong model: the summary must tell them apart."""
    import subprocess
    import sys

    (tmp_path / "s.json").write_text(json.dumps([{"content": "", "finish_reason": "error"}]))
    cmd = [sys.executable, "-m", "moonlet.cli", "eval", "python", "--scripted", str(tmp_path / "s.json"), "--n", "2",
           "--workdir", str(tmp_path), "--json", "--no-progress", "--out", str(tmp_path / "e.jsonl")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 1 and (s["errors"], s["n"]) == (2, 2)
    assert "2 of 2 tasks ended on an error" in p.stderr and "finish_reason 'error'" in p.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)  # the rows of two runs would mix
    assert again.returncode == 1 and "already holds results" in again.stderr
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 2
    sweep = [*cmd[:-1], str(tmp_path / "sweep.jsonl"), "--sweep", "steps=1,2"]
    assert subprocess.run(sweep, capture_output=True, text=True, timeout=60).returncode == 1  # as without --sweep
    for bad in (["--max-steps", "0"], ["--max-time", "-1"], ["--temperature", "nan"], ["--heavy", "0"]):
        p = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and bad[0] in p.stderr and "Traceback" not in p.stderr, bad


def test_a_failing_backend_ends_the_run_with_an_error_that_can_be_resumed():
    def flaky(messages, tools, **kw):
        if sum(m["role"] == "assistant" for m in messages) == 1:
            raise ConnectionError("server went away")
        return turn(call("add", {"a": 1, "b": 1}))

    records: list[dict] = []
    r = Agent(ScriptedBackend(flaky), [add], on_record=records.append).run("q")
    assert (r.stop_reason, r.steps, r.error) == ("error", 1, "ConnectionError: server went away")
    assert records[-1]["type"] == "end" and records[-1]["error"] == r.error
    from moonlet.agent.trace import replay

    be = ScriptedBackend([turn(call("add", {"a": 1, "b": 1})), turn(content="2")])
    again = Agent(be, [add]).run(resume=replay(records))
    assert (again.stop_reason, again.answer, again.steps) == ("answer", "2", 2)


def test_streamed_openai_chunks_become_one_turn_and_text_reaches_on_delta():
    from openai.types.chat import ChatCompletionChunk

    from moonlet.agent.backends import turn_from_stream

    def chunk(delta: dict, finish=None, usage=None):
        return ChatCompletionChunk.model_validate({
            "id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else [],
            "usage": usage})

    chunks = [chunk({"role": "assistant", "reasoning": "let "}), chunk({"reasoning_content": "me add"}),
              chunk({"content": "Sure."}),
              chunk({"tool_calls": [{"index": 0, "id": "functions.add:0", "type": "function",
                                     "function": {"name": "add", "arguments": '{"a": '}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1, \"b\": 2}"}}]}),
              chunk({"tool_calls": [{"index": 1, "id": "functions.add:1", "type": "function",
                                     "function": {"name": "add", "arguments": "{}"}}]}),
              chunk({}, finish="tool_calls"),
              chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14})]
    got: list[dict] = []
    t = turn_from_stream(iter(chunks), got.append)
    assert (t.reasoning_content, t.content, t.finish_reason) == ("let me add", "Sure.", "tool_calls")
    assert [c["function"]["arguments"] for c in t.tool_calls] == ['{"a": 1, "b": 2}', "{}"]
    assert [c["id"] for c in t.tool_calls] == ["functions.add:0", "functions.add:1"]
    assert got == [{"reasoning_content": "let "}, {"reasoning_content": "me add"}, {"content": "Sure."}]
    assert t.usage["prompt_tokens"] == 9 and t.usage["completion_tokens"] == 5


def test_without_a_terminal_the_approver_rejects_and_says_how_to_approve(monkeypatch):
    import io

    from moonlet.agent.cli import terminal_approver

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a tty: never read
    verdict = terminal_approver()(call("rm", {"path": "x"}, id="1"), None)
    assert isinstance(verdict, str) and "--yes" in verdict
