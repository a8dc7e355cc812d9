"""Heavy mode (N parallel trajectories + one reflective aggregation, majority vote as the fallback), and the
local backend over the real moonlet engine (a tiny random model: plumbing, not quality)."""

from __future__ import annotations

import json
import threading

import pytest

from moonlet.agent.backends import LocalBackend, ScriptedBackend
from moonlet.agent.heavy import AGGREGATE_PROMPT, majority_vote, run_heavy
from moonlet.agent.loop import Agent, Budget
from moonlet.agent.tools import calculator
from moonlet.agent.trace import Trace, read_trace

ANSWERS = ["Paris", "paris.", "Lyon", " PARIS "]
AGG_HEAD = AGGREGATE_PROMPT.split("{")[0]


def heavy_script(barrier: threading.Barrier | None = None, aggregate: str | Exception = "Paris, agreed"):
    """Trajectory i (seed i) computes i*i with the calculator, then answers ANSWERS[i]."""
    def script(messages, tools, seed=None, **kw):
        if tools is None:  # the aggregation call
            assert AGG_HEAD in messages[-1]["content"]
            if isinstance(aggregate, Exception):
                raise aggregate
            return {"reasoning_content": "three of four say Paris", "content": aggregate}
        if not any(m["role"] == "assistant" for m in messages):
            if barrier is not None:
                barrier.wait()  # all trajectories are in flight at once
            return {"reasoning_content": f"attempt {seed}",
                    "tool_calls": [{"name": "calculator", "arguments": {"expression": f"{seed}*{seed}"}}]}
        return {"reasoning_content": f"so the answer is {ANSWERS[seed]}", "content": ANSWERS[seed]}
    return script


def make(backend, **kw):
    return lambda i: Agent(backend, [calculator], seed=i, **kw)


def test_trajectories_run_in_parallel_from_the_same_prompt_and_are_aggregated():
    be = ScriptedBackend(heavy_script(threading.Barrier(4, timeout=10)))
    h = run_heavy(make(be), be, "Capital of France?", 4)
    assert (h.answer, h.method) == ("Paris, agreed", "aggregate")
    assert [r.answer for r in h.results] == ANSWERS and h.steps == 8
    firsts = [c["messages"] for c in be.calls if c["tools"] is not None and len(c["messages"]) == 1]
    assert len(firsts) == 4 and all(m == firsts[0] for m in firsts)  # one shared prefix for the prefix cache
    agg = be.calls[-1]["messages"][-1]["content"]
    for i, a in enumerate(ANSWERS):
        assert f"# Attempt {i + 1}" in agg and a in agg
        assert f'calculator({{"expression": "{i}*{i}"}}) -> {i * i}' in agg  # how it was reached
    assert "so the answer is Lyon" in agg and "Capital of France?" in agg


def test_the_vote_counts_only_trajectories_that_answered():
    """Trajectory 0 answers; 1 and 2 are stopped by max_steps mid-search: their last words are no answer."""
    def script(messages, tools, seed=None, **kw):
        if tools is None:
            raise RuntimeError("aggregation down")
        if seed == 0:
            return {"content": "Paris"}
        return {"content": "Let me search for it.", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1"}'}}]}

    be = ScriptedBackend(script)
    h = run_heavy(make(be, budget=Budget(max_steps=2)), be, "Capital?", 3)
    assert (h.answer, h.method) == ("Paris", "vote")
    assert [r.stop_reason for r in h.results] == ["answer", "max_steps", "max_steps"]


@pytest.mark.parametrize("aggregate", [RuntimeError("server down"), "   "])
def test_a_failed_or_empty_aggregation_falls_back_to_majority_vote(aggregate):
    be = ScriptedBackend(heavy_script(aggregate=aggregate))
    h = run_heavy(make(be), be, "Capital of France?", 4)
    assert (h.answer, h.method) == ("Paris", "vote")


def test_majority_vote_ignores_case_punctuation_and_empty_answers_and_ties_go_first():
    assert majority_vote(["", "B", "a", "A.", "b "]) == "B"
    assert majority_vote(["x", "", "y", "y"]) == "y"
    assert majority_vote(["", ""]) == ""


def test_heavy_resume_continues_only_unfinished_trajectories(tmp_path):
    path = tmp_path / "t.jsonl"
    with Trace(path) as tr:
        run_heavy(make(ScriptedBackend(heavy_script())), None, "Capital?", 3, trace=tr)
    full = read_trace(path)
    # as if killed while trajectory 2 was about to answer: no end for it, no aggregation
    last2 = max(i for i, r in enumerate(full) if r.get("traj") == 2 and r["type"] == "tool")
    cut = [r for i, r in enumerate(full) if r["type"] != "aggregate"
           and not (r.get("traj") == 2 and i > last2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in cut))
    be = ScriptedBackend(heavy_script())
    with Trace(path) as tr:
        h = run_heavy(make(be), be, "Capital?", 3, trace=tr, resume=read_trace(path))
    assert [c["seed"] for c in be.calls] == [2, None]  # trajectory 2's last step, then the aggregation
    assert h.answer == "Paris, agreed" and [r.answer for r in h.results] == ANSWERS[:3]
    again = run_heavy(make(be), be, "Capital?", 3, resume=read_trace(path))
    assert again.answer == h.answer and len(be.calls) == 2  # finished: nothing runs


def test_when_every_trajectory_fails_there_is_no_answer_and_a_resume_retries_them(tmp_path):
    def down(messages, tools, **kw):
        raise ConnectionError("backend down")

    path = tmp_path / "t.jsonl"
    with Trace(path) as tr:
        h = run_heavy(make(ScriptedBackend(down)), ScriptedBackend(down), "Capital?", 3, trace=tr)
    assert (h.answer, h.method) == ("", "error") and "backend down" in h.error
    assert not any(r["type"] == "aggregate" for r in read_trace(path))  # no answer was recorded as final
    be = ScriptedBackend(heavy_script())
    with Trace(path) as tr:
        again = run_heavy(make(be), be, "Capital?", 3, trace=tr, resume=read_trace(path))
    assert (again.answer, again.method) == ("Paris, agreed", "aggregate")


# ------------------------------------------------------------------------------------- the real engine

@pytest.fixture(scope="module")
def local():
    import moonlet
    from moonlet.engine import Engine
    from moonlet.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    engine = Engine(moonlet.load("tiny", seed=0), tok, max_batch_size=4, max_seq_len=1024).start()
    yield LocalBackend(engine, tok), tok
    engine.stop()


def test_the_local_backend_completes_a_turn_with_usage_counted(local):
    from moonlet.chat import render_ids

    be, tok = local
    r = Agent(be, [calculator], budget=Budget(max_tokens_per_step=8, max_steps=1), seed=0).run("What is 2+2?")
    prompt, _ = render_ids(r.messages[:1], tok, tools=[calculator.spec()], add_generation_prompt=True)
    assert r.steps == 1 and r.stop_reason in ("truncated", "answer", "max_steps")
    first = r.messages[1]
    assert first["role"] == "assistant" and isinstance(first["reasoning_content"], str)
    assert r.usage["prompt_tokens"] == len(prompt) == be.count_tokens(r.messages[:1], [calculator.spec()])
    assert 1 <= r.usage["completion_tokens"] <= 8 and r.usage["reasoning_tokens"] <= r.usage["completion_tokens"]


def test_a_later_step_over_the_same_conversation_hits_the_engine_prefix_cache(local):
    be, _ = local
    agent = Agent(be, [calculator], budget=Budget(max_tokens_per_step=4, max_steps=1), seed=1)
    first = agent.run("Name three prime numbers and add them.")
    follow = first.messages + [{"role": "user", "content": "Now multiply them."}]
    second = Agent(be, [calculator], budget=Budget(max_tokens_per_step=4, max_steps=1), seed=1).run(messages=follow)
    assert first.usage["prompt_tokens"] >= 32  # the tools declaration alone is longer than two cache blocks
    assert second.usage["cached_tokens"] >= 16 * (first.usage["prompt_tokens"] // 16) - 16


def test_heavy_mode_on_the_local_engine_shares_the_prompt_through_the_prefix_cache(local):
    be, _ = local
    h = run_heavy(lambda i: Agent(be, [calculator], budget=Budget(max_tokens_per_step=4, max_steps=1), seed=i),
                  be, "Is 91 prime? (heavy)", 3, max_tokens=4)
    assert len(h.results) == 3 and h.method in ("aggregate", "vote")
    assert sum(r.usage["cached_tokens"] for r in h.results) >= 2 * 16  # the later branches reuse the prompt


def test_the_local_backend_streams_text_as_the_engine_generates_it(local):
    be, _ = local
    pieces: list[dict] = []
    t = be.complete([{"role": "user", "content": "Stream please."}], None, max_tokens=12, seed=3,
                    on_delta=pieces.append)
    assert t.finish_reason == "stop" or (len(pieces) > 1 and t.usage["completion_tokens"] == 12)
    assert "".join(p.get("reasoning_content", "") for p in pieces) == t.reasoning_content
    assert "".join(p.get("content", "") for p in pieces) == t.content


def test_trace_show_json_gives_the_aggregate_and_every_trajectory(tmp_path, capsys):
    from moonlet.agent.trace import cli_trace

    path = tmp_path / "t.jsonl"
    be = ScriptedBackend(heavy_script())
    with Trace(path) as tr:
        h = run_heavy(make(be), be, "Capital of France?", 3, trace=tr)
    assert cli_trace(["show", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["heavy"], s["finished"], s["answer"], s["method"]) == (3, True, "Paris, agreed", "aggregate")
    assert [t["answer"] for t in s["trajectories"]] == ANSWERS[:3] and s["usage"] == h.usage
    assert all((t["steps"], t["tool_calls"], t["finished"]) == (2, 1, True) for t in s["trajectories"])
    assert cli_trace(["show", str(path), "--json", "--traj", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == ANSWERS[2]
