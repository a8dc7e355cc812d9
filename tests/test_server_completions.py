"""`moonlet serve`'s POST /v1/completions (the legacy text endpoint vLLM's benchmarks and raw-prompt clients
use), spoken to by the official `openai` client over real HTTP on 127.0.0.1, against the tiny preset through
the real Engine. The chat route is the reference: the K2 prompt it renders, sent here as ids or as text, must
give the same tokens with the same logprobs."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from moonlet import chat  # noqa: E402
from moonlet.checkpoint import model_dir  # noqa: E402
from moonlet.server_bench import spawn_server, stop_server  # noqa: E402
from moonlet.tokenizer import load_tokenizer  # noqa: E402

MAX_LEN = 512
GREEDY = dict(model="tiny", temperature=0, max_tokens=8, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def client():
    proc, url = spawn_server(["--model", "tiny", "--max-model-len", str(MAX_LEN), "--max-batch-size", "8"])
    try:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(model_dir("tiny"))


def chat_prompt(tok, text: str) -> list[int]:
    return chat.render_ids([{"role": "user", "content": text}], tok, add_generation_prompt=True)[0]


def test_a_prompt_of_ids_or_of_text_runs_as_given_the_same_as_the_chat_route_renders_it(client, tok):
    """Every generated token, markers included, in the legacy logprobs shape: tokens, their logprobs, the top
    alternatives by token text, and where each token's text starts."""
    msgs = [{"role": "user", "content": "Say something"}]
    ref = client.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=2, **GREEDY).choices[0]
    ids = chat_prompt(tok, "Say something")
    for prompt in (ids, tok.decode(ids)):  # text: special tokens written out are read as special tokens
        r = client.completions.create(prompt=prompt, logprobs=2, **GREEDY)
        c = r.choices[0]
        assert r.object == "text_completion" and r.usage.prompt_tokens == len(ids)
        assert r.usage.completion_tokens == 8 and c.finish_reason == "length"
        assert c.logprobs.tokens == [e.token for e in ref.logprobs.content]
        assert [round(v, 4) for v in c.logprobs.token_logprobs] == [round(e.logprob, 4) for e in ref.logprobs.content]
        assert [list(d) for d in c.logprobs.top_logprobs] == [[t.token for t in e.top_logprobs] for e in ref.logprobs.content]
        assert c.text == bytes(b for e in ref.logprobs.content for b in e.bytes).decode("utf-8", "replace")
        assert c.logprobs.text_offset[0] == 0 and c.logprobs.text_offset == sorted(c.logprobs.text_offset)


def test_echo_puts_the_prompt_first_and_a_stream_adds_up_to_the_whole(client, tok):
    prompt = "def fibonacci(n):\n"
    whole = client.completions.create(prompt=prompt, echo=True, **GREEDY).choices[0]
    plain = client.completions.create(prompt=prompt, **GREEDY).choices[0]
    assert whole.text == prompt + plain.text and plain.text
    chunks = list(client.completions.create(prompt=prompt, echo=True, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == len(tok.encode(prompt))


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(client, tok):
    """lm-eval's loglikelihood request: the prompt's tokens come back first with their logprobs (none for the first
    token), equal to the model's own log_softmax at each position, and text_offset points at each token's text."""
    import torch

    import moonlet

    prompt = "def fibonacci(n):\n    return"
    ids = tok.encode(prompt)
    kw = dict(model="tiny", prompt=prompt, echo=True, logprobs=2, max_tokens=1, temperature=0)
    c = client.completions.create(**kw).choices[0]
    lp = c.logprobs
    assert lp.tokens[: len(ids)] == [tok.decode([t]) for t in ids] and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = moonlet.load("tiny")(torch.tensor([ids]))[0, :-1].log_softmax(-1)
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx([float(ref[i, t]) for i, t in enumerate(ids[1:])], abs=1e-4)
    assert [list(d) for d in lp.top_logprobs[1 : len(ids)]] == [[tok.decode([t]) for t in row.topk(2).indices.tolist()]
                                                               for row in ref]
    assert all(c.text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens)) and c.text.startswith(prompt)
    streamed = [ch.choices[0].logprobs for ch in client.completions.create(stream=True, **kw) if ch.choices]
    assert sum((s.tokens for s in streamed if s), []) == lp.tokens
    assert sum((s.token_logprobs for s in streamed if s), []) == lp.token_logprobs
    only = client.completions.create(**(kw | {"max_tokens": 0}))  # score the prompt, generate nothing
    assert only.choices[0].text == prompt and only.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]
    assert only.usage.completion_tokens == 0 and only.choices[0].finish_reason == "length"
    echo_only = client.completions.create(model="tiny", prompt=prompt, echo=True, max_tokens=0).choices[0]
    assert echo_only.text == prompt and echo_only.logprobs is None


def test_prompt_logprobs_come_in_vllms_shape_on_both_routes(client, tok):
    """vLLM's `prompt_logprobs` extension: per prompt token after the first, {id: {logprob, rank, decoded_token}}
    for it and the k most likely tokens; in each choice of /v1/completions, once in a chat response. The values
    are the model's own log_softmax; it is refused with stream (as vLLM does) and above 20."""
    import torch

    import moonlet

    text = "def fibonacci(n):\n    return"
    ids = tok.encode(text)
    c = client.completions.create(model="tiny", prompt=text, max_tokens=1, extra_body={"prompt_logprobs": 2},
                                  echo=True, logprobs=1).choices[0]
    plp = c.prompt_logprobs
    with torch.no_grad():
        ref = moonlet.load("tiny")(torch.tensor([ids]))[0, :-1].log_softmax(-1)
    assert plp[0] is None and len(plp) == len(ids)
    for row, t, d in zip(ref, ids[1:], plp[1:]):
        top = row.topk(2).indices.tolist()
        assert list(d)[0] == str(t) and set(d) == {str(t), *map(str, top)}  # the prompt token first
        assert d[str(t)]["logprob"] == pytest.approx(float(row[t]), abs=1e-4)
        rank = d[str(t)]["rank"]  # (bounds allow float differences in near-ties)
        assert 1 + int((row > row[t] + 1e-4).sum()) <= rank <= 1 + int((row > row[t] - 1e-4).sum())
        assert d[str(t)]["decoded_token"] == tok.decode([t]) and [d[str(a)]["rank"] for a in top] == [1, 2]
    assert all(len(x) == 1 for x in c.logprobs.top_logprobs[1:])  # echo's legacy logprobs keep their own k
    chat_ids = chat_prompt(tok, "Hello")
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=1,
                                       extra_body={"prompt_logprobs": 0})
    by_ids = client.completions.create(model="tiny", prompt=chat_ids, max_tokens=1, extra_body={"prompt_logprobs": 0})
    assert r.prompt_logprobs == by_ids.choices[0].prompt_logprobs and len(r.prompt_logprobs) == len(chat_ids)
    assert "prompt_logprobs" not in (client.completions.create(model="tiny", prompt=text, max_tokens=1)
                                     .choices[0].model_extra or {})
    for kw in ({"stream": True}, {"extra_body": {"prompt_logprobs": 21}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=text, max_tokens=1,
                                      **({"extra_body": {"prompt_logprobs": 1}} | kw))
        assert e.value.body["param"] == "prompt_logprobs"


def test_return_token_ids_gives_the_prompt_and_output_ids_streamed_or_not(client, tok):
    """vLLM's `return_token_ids` (what RL code trains on): the prompt's ids (in the choice on /v1/completions,
    once at the top of a chat response or stream) and the generated ids, which a stream spreads over its chunks."""
    text = "def fibonacci(n):\n    return"
    kw = GREEDY | {"prompt": text, "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    c = client.completions.create(**kw).choices[0]
    assert c.prompt_token_ids == tok.encode(text) and len(c.token_ids) == 8 and tok.decode(c.token_ids) == c.text
    for echo in (False, True):
        chunks = [ch.choices[0] for ch in client.completions.create(stream=True, echo=echo, **kw) if ch.choices]
        assert chunks[0].prompt_token_ids == c.prompt_token_ids
        assert not any(getattr(ch, "prompt_token_ids", None) for ch in chunks[1:])
        assert sum((ch.token_ids for ch in chunks), []) == c.token_ids
    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(messages=messages, **GREEDY | {"extra_body": kw["extra_body"]})
    assert r.prompt_token_ids == chat_prompt(tok, "Hello")
    assert r.choices[0].token_ids == client.completions.create(**kw | {"prompt": r.prompt_token_ids}).choices[0].token_ids
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **GREEDY | {"extra_body": kw["extra_body"]}))
    assert chunks[0].prompt_token_ids == r.prompt_token_ids and sum((ch.choices[0].token_ids for ch in chunks), []) \
        == r.choices[0].token_ids
    plain = client.completions.create(**GREEDY | {"prompt": text}).choices[0]
    assert "token_ids" not in (plain.model_extra or {})
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw | {"extra_body": {"return_token_ids": "yes"}})
    assert e.value.body["param"] == "return_token_ids"


def test_penalties_and_logit_bias_reach_the_engine(client, tok):
    """OpenAI's presence/frequency penalties and logit_bias, and vLLM's repetition_penalty, min_p and min_tokens,
    give what the same SamplingParams give the engine in process (checked against HF transformers in
    test_engine); a +100 bias makes a token the only one."""
    import moonlet
    from moonlet.engine import Engine, SamplingParams

    text = "The capital of France"
    ids = tok.encode(text)
    eng = Engine(moonlet.load("tiny"), tok, max_seq_len=64)
    settings = [dict(frequency_penalty=1.2, presence_penalty=0.5), dict(repetition_penalty=1.4),
                dict(min_tokens=6, temperature=0.8, min_p=0.2, seed=3)]
    for kw in settings:
        want = eng.submit(ids, SamplingParams(**{"temperature": 0, "max_tokens": 8} | kw)).result().output_ids
        body = {"return_token_ids": True} | {k: v for k, v in kw.items() if k not in ("temperature", "seed")}
        got = client.completions.create(model="tiny", prompt=text, max_tokens=8, temperature=kw.get("temperature", 0),
                                        seed=kw.get("seed"), extra_body=body).choices[0]
        assert got.token_ids == want
    word = tok.encode(" Paris")[0]
    c = client.completions.create(model="tiny", prompt=text, max_tokens=5, temperature=1.0,
                                  logit_bias={str(word): 100}, extra_body={"return_token_ids": True}).choices[0]
    assert c.token_ids == [word] * 5


def test_tokenize_counts_what_each_route_feeds_the_model_and_detokenize_inverts_it(client, tok):
    """vLLM's /tokenize and /detokenize: a prompt's tokens are what /v1/completions reads, a chat's (with tools)
    are the prompt the chat route renders, and the counts equal those routes' usage.prompt_tokens."""
    import json
    import urllib.error
    import urllib.request

    root = str(client.base_url).rstrip("/").removesuffix("/v1")

    def post(path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(root + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    text = "<|im_user|>user<|im_middle|>Hi there"
    t = post("/tokenize", {"model": "tiny", "prompt": text, "return_token_strs": True})[1]
    assert t["tokens"] == tok.encode(text, allow_special=True) and t["max_model_len"] == MAX_LEN
    assert t["count"] == client.completions.create(model="tiny", prompt=text, max_tokens=1).usage.prompt_tokens
    assert "".join(t["token_strs"]) == text
    tools = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    c = post("/tokenize", {"messages": messages, "tools": tools})[1]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=tools, max_tokens=1,
                                       extra_body={"return_token_ids": True})
    assert c["tokens"] == r.prompt_token_ids and c["count"] == r.usage.prompt_tokens
    bare = post("/tokenize", {"messages": messages, "add_generation_prompt": False})[1]["tokens"]
    assert len(bare) < c["count"]
    assert post("/detokenize", {"tokens": t["tokens"]}) == (200, {"prompt": text})
    for path, body, param in [("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
                              ("/tokenize", {"messages": [{"role": "wizard"}]}, "messages[0].role"),
                              ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
                              ("/tokenize", {"model": "other", "prompt": "a"}, "model")]:
        status, bad = post(path, body)
        assert status in (400, 404) and bad["error"]["param"] == param


def test_a_batch_of_prompts_gives_n_choices_each_in_prompt_order(client, tok):
    a, b = "The capital of France", "import numpy as np"
    one = {p: client.completions.create(prompt=p, **GREEDY).choices[0].text for p in (a, b)}
    r = client.completions.create(prompt=[a, b], n=2, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [one[a], one[a], one[b], one[b]]  # greedy: a prompt's n choices agree
    assert r.usage.prompt_tokens == len(tok.encode(a)) + len(tok.encode(b))  # each prompt counted once
    assert r.usage.completion_tokens == 4 * 8


def test_stop_strings_and_max_tokens_end_a_text_completion(client):
    full = client.completions.create(prompt="Once upon a time", model="tiny", temperature=0, max_tokens=12,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[3:6]
    cut = client.completions.create(prompt="Once upon a time", model="tiny", temperature=0, max_tokens=12,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]


@pytest.mark.parametrize("kw, param", [
    ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": ["ok", 3]}, "prompt"),
    ({"prompt": [1, 10 ** 9]}, "prompt"), ({"prompt": "word " * MAX_LEN}, "prompt"),
    ({"prompt": "hi", "max_tokens": MAX_LEN}, "max_tokens"), ({"prompt": "hi", "echo": 1}, "echo"), ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "suffix": "end"}, "suffix"), ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"), ({"prompt": ["a"] * 9, "n": 8}, "prompt"),
])
def test_bad_completion_requests_get_400_naming_the_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", **({"max_tokens": 2} | kw))
    assert e.value.body["message"] and e.value.body["param"] == param
