"""Context management: prompts stay under the limit by hiding earlier tool outputs behind a placeholder,
each call still paired with its result. Token counts come from the real moonlet tokenizer + K2 render."""

from __future__ import annotations

import json

import pytest

from moonlet.agent.backends import ScriptedBackend
from moonlet.agent.context import PLACEHOLDER, ContextFull, ContextManager, token_counter
from moonlet.agent.loop import Agent, Budget
from moonlet.agent.tools import tool

COUNT = token_counter()  # moonlet.chat.render_ids with the default tokenizer


def episode(n_calls: int, output: str) -> list[dict]:
    msgs = [{"role": "user", "content": "read everything"}]
    for i in range(n_calls):
        cid = f"functions.read:{i}"
        msgs.append({"role": "assistant", "content": "", "reasoning_content": f"step {i}",
                     "tool_calls": [{"id": cid, "type": "function",
                                     "function": {"name": "read", "arguments": json.dumps({"page": i})}}]})
        msgs.append({"role": "tool", "tool_call_id": cid, "content": f"page {i}: {output}"})
    return msgs


def assert_paired(messages: list[dict]) -> None:
    """Every call has exactly one result right after its turn, and no result lacks a call."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and m.get("tool_calls"):
            ids = [c["id"] for c in m["tool_calls"]]
            after = [x["tool_call_id"] for x in messages[i + 1:i + 1 + len(ids)] if x["role"] == "tool"]
            assert after == ids, (i, ids, after)
    calls = {c["id"] for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []}
    assert {m["tool_call_id"] for m in messages if m["role"] == "tool"} <= calls


def test_the_real_counter_matches_the_rendered_prompt_length():
    from moonlet import chat
    from moonlet.tokenizer import load_tokenizer

    msgs = episode(3, "lorem ipsum " * 20)
    ids = load_tokenizer(None).encode(chat.render(msgs, add_generation_prompt=True), allow_special=True)
    assert COUNT(msgs, None) == len(ids) == COUNT(msgs, None)  # memoized encodes give the same count
    tools = [tool(episode).spec()]
    with_tools = load_tokenizer(None).encode(chat.render(msgs, tools, add_generation_prompt=True), allow_special=True)
    assert COUNT(msgs, tools) == len(with_tools)


def test_a_prompt_under_the_limit_is_sent_unchanged():
    msgs = episode(3, "short")
    view, hidden = ContextManager(10_000, COUNT).fit(msgs)
    assert view == msgs and hidden == []


def test_over_the_limit_earlier_tool_outputs_are_hidden_and_calls_and_reasoning_kept():
    msgs = episode(6, "lorem ipsum dolor sit amet " * 40)
    full = COUNT(msgs, None)
    cm = ContextManager(full - 100, COUNT)
    view, hidden = cm.fit(msgs)
    assert hidden == [f"functions.read:{i}" for i in range(5)]  # all but the latest turn's output
    assert COUNT(view, None) <= full - 100
    assert [m["content"] for m in view if m["role"] == "tool"][:5] == [PLACEHOLDER] * 5
    assert view[-1] == msgs[-1]  # the newest output is what the model is about to read
    assert [m for m in view if m["role"] != "tool"] == [m for m in msgs if m["role"] != "tool"]
    assert_paired(view)
    assert msgs[2]["content"].startswith("page 0")  # the conversation itself keeps everything


def test_hiding_is_sticky_so_the_prompt_prefix_stays_stable():
    msgs = episode(6, "lorem ipsum dolor sit amet " * 40)
    cm = ContextManager(COUNT(msgs, None) - 100, COUNT)
    first, _ = cm.fit(msgs)
    msgs += episode(2, "tiny")[1:]  # two more short steps: no new hiding, old outputs stay hidden
    second, hidden = cm.fit(msgs)
    assert hidden == [] and second[: len(first)] == first


def test_the_latest_outputs_are_hidden_too_when_needed_and_context_full_after_that():
    msgs = episode(2, "lorem ipsum dolor sit amet " * 200)
    all_hidden = [m | {"content": PLACEHOLDER} if m["role"] == "tool" else m for m in msgs]
    cm = ContextManager(COUNT(all_hidden, None), COUNT)
    view, hidden = cm.fit(msgs)
    assert len(hidden) == 2 and all(m["content"] == PLACEHOLDER for m in view if m["role"] == "tool")
    with pytest.raises(ContextFull, match="limit is 5"):
        ContextManager(5, COUNT).fit(msgs)


def test_the_agent_command_says_why_the_context_is_full_and_exits_1(tmp_path, capsys):
    from moonlet.agent.cli import cli_agent

    turns = tmp_path / "s.json"
    turns.write_text(json.dumps([{"content": "never reached"}]))
    code = cli_agent(["q", "--scripted", str(turns), "--context-limit", "600", "--max-tokens", "500",
                      "--trace", str(tmp_path / "t.jsonl"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "the context is full" in err and "the limit is 100" in err and "max_tokens 500" in err


def test_a_300_step_run_keeps_every_prompt_under_the_context_limit():
    @tool
    def read(page: int) -> str:
        """Read one page."""
        return f"page {page}: " + " ".join(f"word{(page * 7 + j) % 101}" for j in range(150))

    steps, limit, max_tokens = 300, 32768, 4096  # ~60 tokens a step remain once outputs are hidden
    script = [{"reasoning_content": f"I need page {i}.", "content": "",
               "tool_calls": [{"name": "read", "arguments": {"page": i}}]} for i in range(steps - 1)]
    script.append({"reasoning_content": "I have read them all.", "content": "done"})
    be = ScriptedBackend(script)
    records: list[dict] = []
    r = Agent(be, [read], budget=Budget(max_tokens_per_step=max_tokens), context_limit=limit,
              count_tokens=COUNT, on_record=records.append).run("Read pages 0..298.")
    assert (r.stop_reason, r.steps, r.tool_calls, r.answer) == ("answer", 300, 299, "done")
    recount = token_counter()  # a fresh counter: nothing shared with the one the loop used
    sizes = [recount(c["messages"], c["tools"]) for c in be.calls]
    assert max(sizes) <= limit - max_tokens
    assert sum(x["type"] == "hide" for x in records) >= 5  # it had to trigger again and again
    for c in be.calls[::37]:
        assert_paired(c["messages"])
    assert all(m["content"] != PLACEHOLDER for m in r.messages)  # nothing lost from the conversation
