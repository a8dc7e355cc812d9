"""moonlet.chat: K2 Thinking rendering (golden strings written by hand from K2_SPEC.md section 4), the SFT
loss mask, parsing of well-formed and malformed output, and the streaming parser's chunk invariance."""

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moonlet.chat import (
    _ALL_MARKERS,
    DEFAULT_SYSTEM,
    StreamParser,
    merge_deltas,
    parse,
    render,
    render_assistant,
    render_ids,
)
from moonlet.tokenizer import load_tokenizer

SYS = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


# --- render: golden strings --------------------------------------------------------------------------

def test_default_system_message_and_generation_prompt():
    assert DEFAULT_SYSTEM == "You are Kimi, an AI assistant created by Moonshot AI."
    assert render([{"role": "user", "content": "Hi"}]) == SYS + "<|im_user|>user<|im_middle|>Hi<|im_end|>" + GEN
    assert render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                  add_generation_prompt=False) == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>")


def test_example_conversation_with_tools_parallel_calls_and_results_renders_exactly():
    messages = [
        {"role": "user", "content": "What's the weather in Paris and Tokyo?"},
        {"role": "assistant", "reasoning_content": "Two cities: call both.", "content": "", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "name": "get_weather", "content": "18°C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "22°C"},
    ]
    expected = (
        '<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_weather",'
        '"description":"Get the weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},'
        '"required":["city"]}}}]<|im_end|>'
        + SYS
        + "<|im_user|>user<|im_middle|>What's the weather in Paris and Tokyo?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>Two cities: call both.</think>"
        "<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "東京"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n18°C<|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:1\n22°C<|im_end|>"
        + GEN
    )
    assert render(messages, tools=TOOLS) == expected


MULTI = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "reasoning_content": "R2", "content": "Let me search.", "tool_calls": [
        {"id": "functions.search:1", "type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}}]},
    {"role": "tool", "tool_call_id": "functions.search:1", "content": "result"},
]


def test_multi_turn_drops_old_reasoning_and_keeps_the_live_episodes():
    # the caller's id functions.search:1 is renumbered: ids count the conversation's calls from 0
    expected = (
        "<|im_system|>system<|im_middle|>S<|im_end|>"
        "<|im_user|>user<|im_middle|>Q1<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>A1<|im_end|>"
        "<|im_user|>user<|im_middle|>Q2<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>R2</think>Let me search.<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.search:0<|tool_call_argument_begin|>{"q": "x"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.search:0\nresult<|im_end|>"
        + GEN
    )
    assert render(MULTI) == expected


def test_a_final_answer_closes_the_episode_and_all_reasoning_before_it_is_dropped():
    messages = MULTI + [{"role": "assistant", "reasoning_content": "R3", "content": "A2"},
                        {"role": "user", "content": "Q3"}]
    text = render(messages, add_generation_prompt=False)
    assert "R1" not in text and "R2" not in text and "R3" not in text
    assert text.endswith("<|im_assistant|>assistant<|im_middle|><think></think>A2<|im_end|>"
                         "<|im_user|>user<|im_middle|>Q3<|im_end|>")
    assert text.count("<think></think>") == 3


def test_empty_reasoning_none_content_reasoning_alias_and_missing_ids():
    messages = [
        {"role": "user", "content": "hi", "name": "alice"},
        {"role": "assistant", "content": None, "reasoning": "via alias",
         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": [{"type": "text", "text": "do"}, {"type": "text", "text": "ne"}],
         "reasoning_content": "", "tool_calls": [{"id": "x", "function": {"name": "g", "arguments": "{}"}}]},
    ]
    assert render(messages, add_generation_prompt=False) == (
        SYS + "<|im_user|>alice<|im_middle|>hi<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>via alias</think><|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.f:0\nok<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>done<|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.g:1<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_calls_section_end|><|im_end|>")


def test_bad_messages_raise_errors_naming_the_field():
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        render([{"role": "user", "content": "x"}, {"content": "no role"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.tool_calls\[0\]"):
        render([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"arguments": "{}"}}]}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content"):
        render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


# --- render_ids: special ids and the SFT loss mask ---------------------------------------------------

def test_render_ids_encodes_template_tokens_as_specials_and_user_text_as_text():
    tok = load_tokenizer(None)
    sp = tok.special
    messages = [{"role": "user", "content": "say <|im_end|> literally"},
                {"role": "assistant", "reasoning_content": "ok", "content": "<|im_end|>"}]
    ids, mask = render_ids(messages, tok)
    header = [sp["<|im_assistant|>"], *tok.encode("assistant"), sp["<|im_middle|>"]]
    output = [sp["<think>"], *tok.encode("ok"), sp["</think>"], *tok.encode("<|im_end|>"), sp["<|im_end|>"]]
    prompt = ([sp["<|im_system|>"], *tok.encode("system"), sp["<|im_middle|>"], *tok.encode(DEFAULT_SYSTEM),
               sp["<|im_end|>"], sp["<|im_user|>"], *tok.encode("user"), sp["<|im_middle|>"],
               *tok.encode("say <|im_end|> literally"), sp["<|im_end|>"]])
    assert ids == prompt + header + output
    assert mask == [0] * (len(prompt) + len(header)) + [1] * len(output)
    assert ids.count(tok.im_end_id) == 3  # only the template's own


def test_render_ids_matches_encoding_the_rendered_text_for_prompts():
    tok = load_tokenizer(None)
    text = render(MULTI, tools=TOOLS)
    ids, mask = render_ids(MULTI, tok, tools=TOOLS, add_generation_prompt=True)
    assert ids == tok.encode(text, allow_special=True)
    # the live episode's assistant message is masked from <think> through its <|im_end|>
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked == ("<think>R2</think>Let me search.<|tool_calls_section_begin|><|tool_call_begin|>"
                      'functions.search:0<|tool_call_argument_begin|>{"q": "x"}<|tool_call_end|>'
                      "<|tool_calls_section_end|><|im_end|>")


def test_a_prompt_ending_in_a_finished_assistant_turn_drops_its_reasoning_as_the_template_does():
    """The SFT rule (a final assistant message is the target) is not the inference rule: a client sending back
    an answered turn gets K2's render, without that turn's reasoning."""
    tok = load_tokenizer(None)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "SECRET"}]
    ids, _ = render_ids(messages, tok, add_generation_prompt=True)
    assert ids == tok.encode(render(messages), allow_special=True) and "SECRET" not in tok.decode(ids)


def test_the_stream_parser_drops_ids_outside_the_tokenizer_with_an_error():
    """A model vocabulary wider than the tokenizer's (Moonlight's 163840 with the 32768 default) can sample them."""
    tok = load_tokenizer(None)
    p = StreamParser(tok)
    assert p.feed_ids([40000, *tok.encode("hi"), -1]) == [{"reasoning_content": "hi"}]
    assert len(p.errors) == 2 and "40000" in p.errors[0]


def test_results_of_calls_sharing_a_caller_id_pair_off_in_order():
    calls = [{"id": "x", "function": {"name": n, "arguments": {}}} for n in ("a", "b")]
    text = render([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": calls},
                   {"role": "tool", "tool_call_id": "x", "content": "ra"},
                   {"role": "tool", "tool_call_id": "x", "content": "rb"}])
    assert "## Return of functions.a:0\nra" in text and "## Return of functions.b:1\nrb" in text


# --- the same format as a Jinja chat template (what transformers, vLLM and SGLang render with) -------------

CONVERSATIONS = {
    "default system": ([{"role": "user", "content": "Hi"}], None),
    "multi turn": (MULTI + [{"role": "assistant", "reasoning_content": "R3", "content": "A2"},
                            {"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "text", "text": "3"}]}],
                   None),
    "parallel calls": ([
        {"role": "user", "content": "What's the weather in Paris and Tokyo?"},
        {"role": "assistant", "reasoning_content": "Two cities: call both.", "content": "", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}}]},
        {"role": "tool", "tool_call_id": "call_b", "name": "get_weather", "content": "22°C"},
        {"role": "tool", "tool_call_id": "call_a", "content": "18°C"}], TOOLS),
    "aliases, no ids, reused ids": ([
        {"role": "user", "content": "hi", "name": "alice"},
        {"role": "assistant", "content": None, "reasoning": "via alias",
         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": None}}]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "done", "reasoning_content": "",
         "tool_calls": [{"id": "x", "function": {"name": n, "arguments": {}}} for n in ("a", "b")]},
        {"role": "tool", "tool_call_id": "x", "content": "ra"},
        {"role": "tool", "tool_call_id": "x", "content": "rb"}], TOOLS),
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_jinja_chat_template_renders_what_render_does(name, tmp_path):
    """Tokenizer.save writes K2's format as tokenizer_config.json's chat_template: transformers'
    apply_chat_template must give render's text, and the ids render_ids gives."""
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(None)
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages, tools = CONVERSATIONS[name]
    for gen in (True, False):
        text = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
        assert text == render(messages, tools, add_generation_prompt=gen)
    ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == render_ids(messages, tok, tools, add_generation_prompt=True)[0]


def test_sft_target_keeps_its_reasoning_and_train_on_selects_messages():
    tok = load_tokenizer(None)
    messages = MULTI + [{"role": "assistant", "reasoning_content": "R3", "content": "A2"}]

    def masked(train_on):
        ids, mask = render_ids(messages, tok, train_on=train_on)
        return tok.decode([i for i, m in zip(ids, mask) if m])

    live = ("<think>R2</think>Let me search.<|tool_calls_section_begin|><|tool_call_begin|>functions.search:0"
            '<|tool_call_argument_begin|>{"q": "x"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
            "<think>R3</think>A2<|im_end|>")
    assert masked("live") == live
    assert masked("last") == "<think>R3</think>A2<|im_end|>"
    assert masked("all") == "<think></think>A1<|im_end|>" + live
    assert "R3" not in render(messages)  # plain render follows K2's template: the final answer's reasoning goes
    with pytest.raises(ValueError, match="train_on"):
        render_ids(messages, tok, train_on="everything")


# --- parse -------------------------------------------------------------------------------------------

def call(id_, args):
    return {"id": id_, "type": "function", "function": {"name": id_.split(".", 1)[1].rsplit(":", 1)[0], "arguments": args}}


def test_parse_reasoning_content_and_parallel_tool_calls():
    text = ("<think>Need both.</think>Checking.<|tool_calls_section_begin|>"
            '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
            '<|tool_call_begin|>functions.web.search:1<|tool_call_argument_begin|>{"q": {"nested": [1, 2]}}<|tool_call_end|>'
            "<|tool_calls_section_end|><|im_end|>")
    assert parse(text) == {
        "reasoning_content": "Need both.", "content": "Checking.",
        "tool_calls": [call("functions.get_weather:0", '{"city": "Paris"}'),
                       call("functions.web.search:1", '{"q": {"nested": [1, 2]}}')],
        "errors": []}


def test_tool_section_ends_reasoning_when_think_never_closed():
    r = parse('<think>plan<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>'
              '{}<|tool_call_end|><|tool_calls_section_end|>')
    assert (r["reasoning_content"], r["content"], r["tool_calls"], r["errors"]) == ("plan", "", [call("functions.f:0", "{}")], [])


def test_without_think_end_or_tool_section_everything_is_reasoning():
    r = parse("just thinking aloud")
    assert r["reasoning_content"] == "just thinking aloud" and r["content"] == "" and r["tool_calls"] == []


def test_whitespace_around_sections_is_tolerated_and_text_kept_verbatim():
    text = ("\n <think>\nR\n</think>\n\nC\n<|tool_calls_section_begin|>\n <|tool_call_begin|> functions.f:0 "
            '<|tool_call_argument_begin|> {"a": 1} \n<|tool_call_end|>\n<|tool_calls_section_end|>\n<|im_end|>')
    assert parse(text) == {"reasoning_content": "\nR\n", "content": "\n\nC\n",
                           "tool_calls": [call("functions.f:0", '{"a": 1}')], "errors": []}


def test_a_leading_assistant_header_is_skipped():
    r = parse("<|im_assistant|>assistant<|im_middle|><think>r</think>c<|im_end|>")
    assert (r["reasoning_content"], r["content"], r["errors"]) == ("r", "c", [])


@pytest.mark.parametrize("text, recovered, error", [
    ("<think>r</think>c<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"a\": ",
     {"content": "c", "tool_calls": [call("functions.f:0", '{"a":')]}, "before <|tool_call_end|>"),
    ("<think>r</think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{bad}"
     "<|tool_call_end|><|tool_calls_section_end|>", {"tool_calls": [call("functions.f:0", "{bad}")]}, "not valid JSON"),
    ("<think>r</think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
     '{"x": Infinity}<|tool_call_end|><|tool_calls_section_end|>',
     {"tool_calls": [call("functions.f:0", '{"x": Infinity}')]}, "Infinity is not JSON"),
    ("<think>r</think><|tool_calls_section_begin|><|tool_call_begin|><|tool_call_argument_begin|>{}<|tool_call_end|>"
     "<|tool_calls_section_end|>", {"tool_calls": [call("functions.unknown:0", "{}")]}, "missing id"),
    ("<think>r<|im_user|></think>c<|im_middle|>d", {"reasoning_content": "r", "content": "cd"}, "stray"),
    ("<think>r</think>c</think>d<think>", {"content": "cd"}, "stray </think>"),
    ("<think>unfinished", {"reasoning_content": "unfinished"}, "reasoning not closed"),
    ("<think></think>a<|tool_call_begin|>functions.g:3<|tool_call_argument_begin|>[]<|tool_call_end|>",
     {"content": "a", "tool_calls": [call("functions.g:3", "[]")]}, "outside a tool call section"),
    ("<think></think><|tool_calls_section_begin|>junk<|tool_calls_section_end|>more", {"tool_calls": []}, "unexpected text"),
    ("<think></think>x<|im_end|>after", {"content": "x"}, "after the end"),
])
def test_malformed_output_recovers_what_it_can_and_reports_errors(text, recovered, error):
    r = parse(text)
    for key, value in recovered.items():
        assert r[key] == value, key
    assert any(error in e for e in r["errors"]), r["errors"]


_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_soup = st.lists(st.one_of(st.sampled_from(_ALL_MARKERS), _texts, st.sampled_from([" ", "\n", '{"a": 1}', "functions.f:0"])),
                 max_size=25).map("".join)


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_soup, st.lists(st.integers(0, 10_000), max_size=12))
def test_stream_deltas_equal_parse_for_any_chunking_even_of_garbage(text, cuts):
    whole = parse(text)  # never raises
    p = StreamParser()
    deltas = [d for chunk in chunked(text, cuts) for d in p.feed_text(chunk)] + p.finish()
    assert merge_deltas(deltas) == {k: whole[k] for k in ("reasoning_content", "content", "tool_calls")}
    assert p.errors == whole["errors"]
    for d in deltas:
        assert len(d) == 1 and all(d.values())
        if "tool_calls" in d:
            (tc,) = d["tool_calls"]
            assert set(tc) in ({"index", "id", "type", "function"}, {"index", "function"})


def test_stream_emits_tool_call_header_first_then_argument_fragments_with_stable_index():
    text = ("<think>r</think><|tool_calls_section_begin|>"
            '<|tool_call_begin|>functions.a:0<|tool_call_argument_begin|>{"x": 1}<|tool_call_end|>'
            '<|tool_call_begin|>functions.b:1<|tool_call_argument_begin|>{"y": 2}<|tool_call_end|>'
            "<|tool_calls_section_end|>")
    p = StreamParser()
    deltas = [d for ch in text for d in p.feed_text(ch)] + p.finish()
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {"index": 0, "id": "functions.a:0", "type": "function", "function": {"name": "a", "arguments": ""}}
    firsts = [i for i, c in enumerate(calls) if "id" in c]
    assert [calls[i]["index"] for i in firsts] == [0, 1]
    assert "".join(c["function"]["arguments"] for c in calls if c["index"] == 0) == '{"x": 1}'
    assert all(c["index"] == 1 for c in calls[firsts[1]:])
    assert not any("<" in c["function"]["arguments"] for c in calls)  # no partial markers leak


def test_in_reasoning_turns_false_exactly_when_reasoning_ends():
    p = StreamParser()
    p.feed_text("<think>abc")
    assert p.in_reasoning
    p.feed_text("</thi")
    assert p.in_reasoning  # a partial marker is held back, not decided
    assert p.feed_text("nk>ans") == [{"content": "ans"}]
    assert not p.in_reasoning and not p.done
    p.feed_text("<|im_end|>")
    assert p.done


def test_stream_from_token_ids_one_by_one_matches_parse():
    tok = load_tokenizer(None)
    msg = {"role": "assistant", "reasoning_content": "Überlegung: 2+2 🤔", "content": "Vier. 四",
           "tool_calls": [{"id": "functions.calc:0", "type": "function",
                           "function": {"name": "calc", "arguments": '{"expr": "2+2", "note": "é"}'}}]}
    ids, _ = render_ids([{"role": "user", "content": "?"}, msg], tok, train_on="last")
    start = len(ids) - 1 - ids[::-1].index(tok.special["<|im_middle|>"]) + 1
    out_ids = ids[start:]
    p = StreamParser(tok)
    deltas = [d for i in out_ids for d in p.feed_ids([i])] + p.finish()
    expected = parse(render_assistant(msg))
    assert merge_deltas(deltas) == {k: expected[k] for k in ("reasoning_content", "content", "tool_calls")}
    assert p.errors == [] and p.done
    assert expected["reasoning_content"] == msg["reasoning_content"]


def test_stray_special_ids_are_dropped_with_an_error():
    tok = load_tokenizer(None)
    p = StreamParser(tok)
    p.feed_ids([tok.think_id, *tok.encode("a"), tok.special["<|im_user|>"], tok.think_end_id, *tok.encode("b")])
    p.finish()
    assert p.result()["reasoning_content"] == "a" and p.result()["content"] == "b"
    assert any("<|im_user|>" in e for e in p.errors)


# --- round trip --------------------------------------------------------------------------------------

def _clean(s: str) -> bool:
    return not any(m in s for m in _ALL_MARKERS)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _texts,
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_texts, kids, max_size=3), max_leaves=8)
_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,15}", fullmatch=True)


@st.composite
def assistant_messages(draw):
    calls = []
    for j in range(draw(st.integers(0, 3))):
        args = draw(st.dictionaries(_texts, _json, max_size=3))
        as_text = draw(st.booleans())
        calls.append({"id": f"functions.{draw(_names)}:{j}", "type": "function",
                      "function": {"name": None, "arguments": json.dumps(args, ensure_ascii=draw(st.booleans())) if as_text else args}})
        calls[-1]["function"]["name"] = calls[-1]["id"][len("functions."):].rsplit(":", 1)[0]
    msg = {"role": "assistant", "reasoning_content": draw(st.text(max_size=30)), "content": draw(st.text(max_size=30))}
    if calls:
        msg["tool_calls"] = calls
    return msg


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(assistant_messages())
def test_render_then_parse_returns_the_same_assistant_message(msg):
    args = [c["function"]["arguments"] for c in msg.get("tool_calls", [])]
    args = [a if isinstance(a, str) else json.dumps(a, ensure_ascii=False) for a in args]
    assume(all(map(_clean, [msg["reasoning_content"], msg["content"], *args])))
    text = render_assistant(msg)
    # the same text sits inside a full rendered conversation when the message is live
    convo = render([{"role": "user", "content": "q"}, msg], add_generation_prompt=False)
    if msg.get("tool_calls"):
        assert convo.endswith(GEN + text)
    got = parse(text)
    assert got["errors"] == []
    assert got["reasoning_content"] == msg["reasoning_content"] and got["content"] == msg["content"]
    want = [{"id": c["id"], "type": "function", "function": {"name": c["function"]["name"], "arguments": a}}
            for c, a in zip(msg.get("tool_calls", []), args)]
    assert got["tool_calls"] == want
