"""`moonlet serve` spoken to by the official `openai` client, over real HTTP on 127.0.0.1.

Two real server subprocesses per module:
- `real`: the tiny preset with random weights through the real Engine (plain generation, batching, n>1,
  usage, disconnects, errors, the API key);
- `scripted`: `--script`, the labelled testing aid that replays fixed K2-format completions token by token
  through the real tokenizer, chat parser and SSE code, because random weights never emit `</think>` or tool
  calls. These tests prove the protocol (reasoning fields, streamed tool-call deltas, tool round trips), not
  any model capability.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import threading
import time
import urllib.request
from urllib.parse import urlsplit

import pytest

openai = pytest.importorskip("openai")

from moonlet.server_bench import spawn_server, stop_server  # noqa: E402
from moonlet.tokenizer import load_tokenizer  # noqa: E402

KEY = "test-key"
MAX_LEN = 4096  # room for a generation that outlasts the disconnect tests (CPU decode is ~1 ms/token)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SCRIPT = [
    {"when": "weather in Paris", "completion": (
        "<think>The user wants the weather. I should call the tool.</think>Let me check."
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')},
    {"when": "## Return of functions.get_weather:0\nsunny, 21 C", "completion": (
        "<think>The tool says sunny.</think>It is sunny in Paris, 21 C.<|im_end|>")},
    {"when": "two cities", "completion": (
        "<think>Two calls.</think><|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
        '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>")},
    # continuations after the server's forced prefix (tool_choice named / required)
    {"when": "force a named call", "completion": '{"city": "Lima"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'},
    {"when": "force any call", "completion": (
        'get_weather:0<|tool_call_argument_begin|>{"city": "Kyiv"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')},
    {"when": "What is 6*7", "completion": (
        "<think>Use the calculator.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0"
        '<|tool_call_argument_begin|>{"expression": "6*7"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')},
    {"when": "## Return of functions.calculator:0\n42", "completion": "<think>It is 42.</think>The answer is 42.<|im_end|>"},
    {"completion": "<think>Just greet.</think>Hello! How can I help?<|im_end|>"},
]


LOGS: dict = {}  # server name -> the tail of its stdout + stderr (spawn_server keeps it)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    script = tmp_path_factory.mktemp("serve") / "script.json"
    script.write_text(json.dumps(SCRIPT))
    procs = {}
    try:
        # start both before waiting for either: their startups overlap
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(2) as pool:
            real = pool.submit(spawn_server, ["--model", "tiny", "--api-key", KEY, "--max-model-len", str(MAX_LEN),
                                              "--max-batch-size", "16"])
            scripted = pool.submit(spawn_server, ["--model", "tiny", "--script", str(script), "--script-delay", "0.002"])
            for name, fut in (("real", real), ("scripted", scripted)):
                procs[name] = fut.result()
                LOGS[name] = procs[name][0].log
        yield {name: url for name, (_, url) in procs.items()}
    finally:
        for proc, _ in procs.values():
            stop_server(proc)


@pytest.fixture(scope="module")
def real(servers):
    return openai.OpenAI(base_url=servers["real"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def scripted(servers):
    return openai.OpenAI(base_url=servers["scripted"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def metrics(base: str) -> str:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def raw_post(base: str, body: bytes, headers: dict | None = None, method: str = "POST") -> tuple[int, dict]:
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, "/v1/chat/completions", body, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


# ----------------------------------------------------------------------------- plain generation (real model)

def test_a_nul_byte_in_a_static_path_is_a_404_and_head_is_answered(servers):
    u = urlsplit(servers["scripted"])
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(b"GET /app.js\x00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 404")
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("HEAD", "/health")
    r = conn.getresponse()
    assert r.status == 200 and int(r.getheader("Content-Length")) > 0 and r.read() == b""
    conn.close()


def http_exchange(base: str, data: bytes) -> bytes:
    """Send raw bytes on one connection and read until the server closes it."""
    u = urlsplit(base)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def test_http_framing_a_get_body_two_lengths_and_an_http_1_0_stream(servers):
    base = servers["scripted"]
    # a GET with a body, then a second request on the same connection: the body is not read as a request line
    out = http_exchange(base, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
                              b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    # status lines only: a bare b"501" can occur in the body (the model list's "created" timestamp)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", out) == [b"200", b"200"]
    assert out.endswith(b'{"status": "ok"}')
    body = json.dumps({"model": "tiny", "messages": user("hi"), "stream": True}).encode()
    out = http_exchange(base, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                              b"Content-Length: 3\r\n\r\n%s" % (len(body), body))
    assert out.startswith(b"HTTP/1.1 400") and b"conflicting Content-Length" in out  # RFC 9112 6.3
    out = http_exchange(base, b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(body), body))
    head, _, events = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()  # 1.0 has no chunked encoding
    assert events.startswith(b"data: {") and events.endswith(b"data: [DONE]\n\n")
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                   for e in events.split(b"\n\n") if e.startswith(b"data: {"))
    assert text == "Hello! How can I help?"


def test_an_engine_failure_is_one_500_in_the_metrics_and_adds_no_tokens(monkeypatch):
    """In process with the real engine and a fault planted in the router (a valid model cannot fail on demand)."""
    import moonlet.server as server_mod
    from moonlet import model

    srv = server_mod.make_server("tiny", port=0, max_model_len=256)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)

        def broken(self, x):
            raise RuntimeError("injected router fault")

        monkeypatch.setattr(model.Router, "forward", broken)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=4)
        assert e.value.body["code"] == "engine_error"
        with pytest.raises(openai.APIError):  # streamed: an error event after the 200 head
            list(client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=4, stream=True))
        m = metrics(base)
        assert metric(m, 'moonlet_requests_total{status="500"}') == 2
        assert metric(m, 'moonlet_requests_total{status="200"}') == 0
        assert metric(m, "moonlet_completion_tokens_total") == 0
    finally:
        srv.shutdown()
        srv.server_close()
        srv.engine.stop()


def test_models_health_and_metrics_endpoints(real, servers):
    assert [m.id for m in real.models.list().data] == ["tiny"]
    with urllib.request.urlopen(servers["real"] + "/health", timeout=10) as r:
        assert json.load(r)["status"] == "ok"
    assert "moonlet_requests_running" in metrics(servers["real"])


def test_nonstreaming_completion_reports_usage_and_finish_reason(real):
    r = real.chat.completions.create(model="tiny", messages=user("Hello there"), max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and c.message.role == "assistant"
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens is not None


def test_greedy_stream_matches_greedy_nonstream(real):
    msgs = user("Tell me a story about the moon")
    whole = real.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(real.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
    text = "".join((c.choices[0].delta.content or "") + (getattr(c.choices[0].delta, "reasoning_content", None) or "")
                   for c in chunks if c.choices)
    m = whole.choices[0].message
    assert text == (m.content or "") + (getattr(m, "reasoning_content", None) or "")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_logprobs_come_with_every_token_streamed_or_not(real):
    """OpenAI's logprobs object: the emitted token (its text and bytes), its logprob and the top alternatives,
    for every generated token; a stream sends each token's with the chunk that carries it (or the next)."""
    kw = dict(model="tiny", messages=user("Say something"), max_tokens=10, temperature=0, logprobs=True,
              top_logprobs=3, extra_body={"ignore_eos": True})
    whole = real.chat.completions.create(**kw).choices[0]
    lps = whole.logprobs.content
    assert len(lps) == 10
    for e in lps:
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token and e.logprob <= 0
        assert len(e.top_logprobs) == 3 and (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    chunks = [c for c in real.chat.completions.create(**kw, stream=True) if c.choices]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in lps]
    plain = real.chat.completions.create(**{**kw, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_repeated_prompt_reports_cached_prompt_tokens(real):
    msgs = user("The same long question about prefix caching, asked twice. " * 4)
    real.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0)
    r = real.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0)
    assert 0 < r.usage.prompt_tokens_details.cached_tokens <= r.usage.prompt_tokens


def test_n_choices_in_one_request(real):
    r = real.chat.completions.create(model="tiny", messages=user("Pick a number"), max_tokens=4, n=3, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    stream = real.chat.completions.create(model="tiny", messages=user("Pick a number"), max_tokens=4, n=2,
                                          stream=True, stream_options={"include_usage": True})
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_thinking_budget_from_extra_body_closes_reasoning_and_seed_repeats(real):
    kw = dict(model="tiny", messages=user("Think briefly"), max_tokens=12, seed=3,
              extra_body={"max_thinking_tokens": 4})
    a, b = real.chat.completions.create(**kw), real.chat.completions.create(**kw)
    assert a.usage.completion_tokens_details.reasoning_tokens == 4
    m = a.choices[0].message
    assert m.model_extra["reasoning_content"] and m.content  # the engine forced </think>: content follows
    assert (m.content, m.model_extra["reasoning"]) == (b.choices[0].message.content, b.choices[0].message.model_extra["reasoning"])


def test_max_tokens_ends_with_length(real):
    r = real.chat.completions.create(model="tiny", messages=user("Count forever"), max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_ignore_eos_generates_exactly_max_tokens(real):
    """vLLM's `ignore_eos` extension, for benchmarks and load tests: neither end-of-turn tokens nor a tool
    section (which ends the turn when no tools are declared) stop the generation."""
    r = real.chat.completions.create(model="tiny", messages=user("Talk on"), n=4,
                                     max_tokens=500, temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.finish_reason for c in r.choices] == ["length"] * 4 and r.usage.completion_tokens == 4 * 500
    with pytest.raises(openai.BadRequestError) as e:
        real.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2,
                                     extra_body={"ignore_eos": "yes"})
    assert e.value.body["param"] == "ignore_eos"


def test_concurrent_streaming_clients_all_finish(real):
    results, errors = [], []

    def one(i: int) -> None:
        try:
            chunks = list(real.chat.completions.create(model="tiny", messages=user(f"client {i}"), max_tokens=6,
                                                       stream=True, stream_options={"include_usage": True}))
            results.append(chunks[-1].usage.completion_tokens)
        except Exception as e:  # collected: the assertion below names it
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 16 and all(0 < n <= 6 for n in results)


def sse_events(raw: bytes) -> list:
    """The data events of a chunked text/event-stream body: parsed JSON objects, then "[DONE]"."""
    body = re.sub(rb"\r\n[0-9a-f]+\r\n", b"", b"\r\n" + raw)
    return [e if e == "[DONE]" else json.loads(e) for e in
            (line[6:].decode() for line in body.split(b"\n") if line.startswith(b"data: "))]


def test_a_client_that_stops_reading_its_stream_does_not_hold_up_the_others():
    """One thread writes every event stream, never blocking on a socket: a client that reads nothing (its
    socket buffer full) keeps its unsent bytes in the server while another stream runs to its end, and it
    gets all of them, in order, when it reads again. In process, over socket pairs with small buffers, with
    the scripted engine producing the tokens."""
    from moonlet.chat import render_ids
    from moonlet.engine import SamplingParams
    from moonlet.openai_api import Choice
    from moonlet.scripted import ScriptedEngine
    from moonlet.server import Metrics
    from moonlet.sse import SSEWriter, Stream

    tok = load_tokenizer("tiny")
    words = "word " * 2000
    engine = ScriptedEngine(tok, [{"completion": f"<think>{words}</think>done<|im_end|>"}])
    writer = SSEWriter(Metrics())
    writer.start()
    prompt = render_ids(user("hi"), tok, add_generation_prompt=True)[0]

    def open_stream(max_tokens: int) -> tuple[Stream, socket.socket]:
        server_end, client_end = socket.socketpair()
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream = Stream(writer, server_end, include_usage=True, t0=time.monotonic())
        stream.head = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "tiny"}
        request = engine.submit(prompt, SamplingParams(max_tokens=max_tokens), stream.listener)
        stream.choices = [Choice(0, request, tok, [], True)]
        writer.hand_over(stream)
        return stream, client_end

    def read_all(client: socket.socket) -> list:
        client.settimeout(10)
        raw = b""
        while not raw.endswith(b"0\r\n\r\n"):
            raw += client.recv(1 << 16)
        return sse_events(raw)

    stalled, stalled_client = open_stream(4000)
    deadline = time.monotonic() + 10
    while not (stalled.choices[0].request.finished and len(stalled.out) > 100_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(stalled.out) > 100_000 and not stalled.done.is_set()  # its bytes wait in the server
    other, other_client = open_stream(8)
    assert other.done.wait(10) and other.gone is None  # the other stream ran to its end meanwhile
    assert read_all(other_client)[-1] == "[DONE]"
    events = read_all(stalled_client)
    assert stalled.done.wait(10) and stalled.gone is None
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas).strip() == words.strip()
    assert "".join(d.get("content") or "" for d in deltas) == "done"
    assert events[-2]["usage"]["completion_tokens"] == stalled.choices[0].request.usage["completion_tokens"]
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_engine_request(servers, stream):
    """ignore_eos: the request must still be running when the client goes (the random model can end early)."""
    base = servers["real"]
    before = metric(metrics(base), 'moonlet_requests_total{status="cancelled"}')
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = json.dumps({"model": "tiny", "messages": user("a long answer please"), "max_tokens": MAX_LEN - 100,
                       "ignore_eos": True, "stream": stream}).encode()
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}",
                                                        "Content-Type": "application/json"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.fp.readline()  # the first chunk arrived: generation is under way
    else:  # nothing is written before the end: the server must notice the closed socket by itself
        time.sleep(0.3)
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = metrics(base)
        if metric(text, 'moonlet_requests_total{status="cancelled"}') > before and \
                metric(text, "moonlet_requests_running") == 0 and metric(text, "moonlet_engine_busy") == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the disconnected request was not cancelled:\n{text}")


def test_a_client_resetting_its_connection_is_counted_not_logged_as_a_server_error(servers):
    """HTTP clients often close a keep-alive connection with bytes unread, which resets it while the server
    waits for the next request. That is routine: no traceback in the log, a count in /metrics, and the
    server goes on serving."""
    base = servers["real"]
    u = urlsplit(base)
    before = metric(metrics(base), "moonlet_client_disconnects_total")
    LOGS["real"].clear()
    for _ in range(3):
        sock = socket.create_connection((u.hostname, u.port), timeout=10)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # its answer is never read
        time.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        sock.close()
    deadline = time.monotonic() + 10
    while metric(metrics(base), "moonlet_client_disconnects_total") < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(metrics(base), "moonlet_client_disconnects_total") >= before + 3
    assert "Traceback" not in "".join(LOGS["real"])
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        assert r.status == 200


def test_bench_serve_streams_every_request_and_reports_latency_throughput_and_client_cpu(servers, capsys):
    from moonlet.server_bench import cli_bench_serve

    assert cli_bench_serve(["--base-url", servers["real"] + "/v1", "--api-key", KEY, "--concurrency", "4",
                            "--requests", "8", "--max-tokens", "4", "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["ok"], out["failed"]) == (8, 0)
    assert out["completion_tokens"] == 8 * 4  # counted from each stream's usage chunk
    assert out["tokens_per_s"] > 0 and out["latency_p50_s"] >= out["ttft_p50_s"] > 0
    assert out["client_cpu_s"] > 0 and out["server_cpu_s"] is None  # another process's server: not measured


# ---------------------------------------------------------------------------------------- bad input -> 4xx

def test_malformed_json_gets_400_error_object(servers):
    status, body = raw_post(servers["real"], b'{"messages": [', {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and body["error"]["code"] == "invalid_json" and body["error"]["message"]
    status, body = raw_post(servers["real"], b'[1, 2]', {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    for method in ("PUT", "DELETE", "OPTIONS"):
        status, body = raw_post(servers["real"], b"{}", method=method)
        assert status == 405 and body["error"]["code"] == "method_not_allowed"
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # too deep for json.loads
    status, body = raw_post(servers["real"], deep, {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and body["error"]["code"] == "invalid_json"


def test_unknown_model_gets_404(real):
    with pytest.raises(openai.NotFoundError) as e:
        real.chat.completions.create(model="gpt-17", messages=user("hi"), max_tokens=2)
    assert e.value.code == "model_not_found"


def test_prompt_over_the_context_limit_gets_400(real):
    with pytest.raises(openai.BadRequestError) as e:
        real.chat.completions.create(model="tiny", messages=user("word " * (2 * MAX_LEN)), max_tokens=2)
    assert e.value.code == "context_length_exceeded" and str(MAX_LEN) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # fits, but not with the completion budget
        real.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=MAX_LEN)
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize("kw", [{"temperature": 2.5}, {"top_p": 0}, {"n": 0}, {"n": 1000}, {"max_tokens": 0},
                                {"max_tokens": "ten"}, {"stop": [""]}, {"tool_choice": "sometimes"},
                                {"presence_penalty": 2.5}, {"min_p": 1.5}, {"repetition_penalty": 0},
                                {"logit_bias": {"ten": 1}}, {"logit_bias": {"5": 101}}, {"logit_bias": {"99999999": 1}},
                                {"min_tokens": 5}, {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21},
                                {"messages": []},
                                {"messages": [{"role": "wizard", "content": "hi"}]},
                                {"messages": user("hi") + [{"role": "assistant", "tool_calls": True}]}])
def test_out_of_range_parameters_get_400_naming_the_field(real, kw):
    extra = {k: v for k, v in kw.items() if k in ("min_p", "repetition_penalty", "min_tokens")}  # vLLM's
    args = {"model": "tiny", "messages": user("hi"), "max_tokens": 2} | {k: v for k, v in kw.items() if k not in extra}
    args |= {"extra_body": extra} if extra else {}
    with pytest.raises(openai.BadRequestError) as e:
        real.chat.completions.create(**args)
    body = e.value.body
    assert body["message"] and body["type"] == "invalid_request_error"
    assert body["param"] is None or body["param"].split("[")[0] in kw


def test_api_key_is_required_when_set(servers):
    client = openai.OpenAI(base_url=servers["real"] + "/v1", api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    status, body = raw_post(servers["real"], b"{}")  # no Authorization header at all
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    for header in (f"bearer {KEY}", f"Bearer  {KEY} "):  # RFC 7235: the scheme is case-insensitive
        status, body = raw_post(servers["real"], b"{}", {"Authorization": header})
        assert status == 400, body  # past the key check, to the body's validation


# --------------------------------------------------------------------- protocol paths (scripted testing aid)

def test_reasoning_is_returned_in_reasoning_content_and_reasoning(scripted):
    r = scripted.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=100)
    m = r.choices[0].message
    assert m.content == "Hello! How can I help?"
    assert m.model_extra["reasoning_content"] == m.model_extra["reasoning"] == "Just greet."
    assert r.usage.completion_tokens_details.reasoning_tokens > 0


def test_streamed_reasoning_comes_before_content_and_ends_with_done(servers):
    u = urlsplit(servers["scripted"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": user("hi"), "stream": True}).encode())
    lines = [ln for ln in conn.getresponse().read().decode().split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    deltas = [json.loads(ln[6:])["choices"][0]["delta"] for ln in lines[:-1]]
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content") and "content" in kinds
    assert "".join(d.get("reasoning", "") for d in deltas) == "Just greet."


def test_streamed_tool_call_then_tool_result_round_trip(scripted):
    msgs = user("What is the weather in Paris?")
    stream = scripted.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER_TOOL], stream=True,
                                              max_tokens=200)
    reasoning, content, calls, finish = "", "", [], None
    for chunk in stream:
        d = chunk.choices[0].delta
        reasoning += d.model_extra.get("reasoning_content") or ""
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.id is not None:  # first delta of a call: index, id, name
                assert tc.index == len(calls) and tc.function.name == "get_weather"
                calls.append({"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": ""}})
            else:
                assert tc.function.name is None
            calls[tc.index]["function"]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "Let me check."
    assert calls[0]["id"] == "functions.get_weather:0" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    # send the call back with its reasoning and the tool result: generation continues to the answer
    msgs += [{"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls},
             {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny, 21 C"}]
    r = scripted.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER_TOOL], max_tokens=200)
    assert r.choices[0].message.content == "It is sunny in Paris, 21 C." and r.choices[0].finish_reason == "stop"


def test_reasoning_sent_back_in_a_tool_episode_reaches_the_prompt_under_either_name(scripted):
    """K2 keeps the live tool episode's reasoning in the prompt; `reasoning` (vLLM) counts like
    `reasoning_content`. Prompt sizes show what the server rendered."""
    r_text = "I should look this up with the weather tool first."
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}

    def prompt_tokens(field: str | None) -> int:
        a = {"role": "assistant", "content": "", "tool_calls": [call]} | ({field: r_text} if field else {})
        msgs = user("weather in Paris?") + [a, {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
        return scripted.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER_TOOL],
                                                max_tokens=50).usage.prompt_tokens

    with_rc, with_r, without = prompt_tokens("reasoning_content"), prompt_tokens("reasoning"), prompt_tokens(None)
    assert with_rc == with_r == without + len(load_tokenizer(None).encode(r_text))


def test_reasoning_of_finished_turns_is_dropped_from_the_prompt(scripted):
    def prompt_tokens(reasoning: str) -> int:
        msgs = user("hi") + [{"role": "assistant", "content": "Hello!", "reasoning_content": reasoning}] + user("again")
        return scripted.chat.completions.create(model="tiny", messages=msgs, max_tokens=50).usage.prompt_tokens

    assert prompt_tokens("a long chain of earlier thought " * 5) == prompt_tokens("")


def test_parallel_tool_calls_false_keeps_only_the_first_call(scripted):
    kw = dict(model="tiny", messages=user("weather in two cities"), tools=[WEATHER_TOOL], max_tokens=200)
    both = scripted.chat.completions.create(**kw).choices[0].message.tool_calls
    one = scripted.chat.completions.create(**kw, parallel_tool_calls=False).choices[0].message.tool_calls
    assert [c.id for c in both] == ["functions.get_weather:0", "functions.get_weather:1"]
    assert [c.id for c in one] == ["functions.get_weather:0"]


def test_a_stop_string_that_cuts_a_tool_call_short_is_not_reported_as_tool_calls(scripted):
    """Half a JSON object is not a call to run: finish_reason says "stop" unless every returned call closed."""
    kw = dict(model="tiny", messages=user("weather in two cities"), tools=[WEATHER_TOOL], max_tokens=200,
              stop=["Rome"])
    r = scripted.chat.completions.create(**kw).choices[0]
    assert r.finish_reason == "stop" and r.message.tool_calls[1].function.arguments == '{"city": "'
    streamed = [c.choices[0].finish_reason for c in scripted.chat.completions.create(**kw, stream=True)]
    assert streamed[-1] == "stop"
    first_only = scripted.chat.completions.create(**kw, parallel_tool_calls=False).choices[0]
    assert first_only.finish_reason == "tool_calls" and first_only.message.tool_calls[0].function.arguments == \
        '{"city": "Oslo"}'


def test_tool_choice_named_and_required_force_a_call(scripted):
    named = scripted.chat.completions.create(
        model="tiny", messages=user("force a named call"), tools=[WEATHER_TOOL], max_tokens=50,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = named.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].id == "functions.get_weather:0"
    assert json.loads(c.message.tool_calls[0].function.arguments) == {"city": "Lima"}
    req = scripted.chat.completions.create(model="tiny", messages=user("force any call"), tools=[WEATHER_TOOL],
                                           max_tokens=50, tool_choice="required")
    assert req.choices[0].message.tool_calls[0].function.name == "get_weather"
    with pytest.raises(openai.BadRequestError):
        scripted.chat.completions.create(model="tiny", messages=user("x"), tools=[WEATHER_TOOL], max_tokens=5,
                                         tool_choice={"type": "function", "function": {"name": "nope"}})


def test_the_scripted_aid_refuses_logprobs_it_has_no_model_for(scripted):
    with pytest.raises(openai.BadRequestError) as e:
        scripted.chat.completions.create(model="tiny", messages=user("hi"), logprobs=True)
    assert "no logprobs" in e.value.message


def test_the_scripted_aid_cuts_stop_strings_as_the_engine_does(scripted):
    r = scripted.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=50, stop=["w can"])
    assert r.choices[0].message.content == "Hello! Ho" and r.choices[0].finish_reason == "stop"


def test_a_model_cannot_call_a_tool_with_tool_choice_none_or_no_tools(scripted):
    """The script calls get_weather for this prompt; with no tool allowed, the tool section ends the turn."""
    for kw in ({"tools": [WEATHER_TOOL], "tool_choice": "none"}, {}):
        r = scripted.chat.completions.create(model="tiny", messages=user("What is the weather in Paris?"),
                                             max_tokens=200, **kw)
        c = r.choices[0]
        assert c.finish_reason == "stop" and not c.message.tool_calls and c.message.content == "Let me check."
        chunks = list(scripted.chat.completions.create(model="tiny", messages=user("What is the weather in Paris?"),
                                                       max_tokens=200, stream=True, **kw))
        assert not any(ch.choices and ch.choices[0].delta.tool_calls for ch in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_moonlet_agent_sizes_its_limits_from_the_served_context(servers):
    """The model card's max_model_len (moonlet serve and vLLM send it) is the agent's default context, so
    its default max_tokens fits the server (K2's 256K context would ask for 16384 and get a 400)."""
    from moonlet.agent.cli import agent_parser, make_backend, resolve_limits
    from moonlet.cli import UsageError

    args = agent_parser().parse_args(["hi", "--base-url", servers["real"] + "/v1", "--api-key", KEY])
    backend, ctx = make_backend(args)
    resolve_limits(args, ctx)
    assert backend.context_length == ctx == args.context_limit == MAX_LEN and args.max_tokens == MAX_LEN // 2
    down = agent_parser().parse_args(["hi", "--base-url", "http://127.0.0.1:9/v1"])  # nothing listens there
    with pytest.raises(UsageError, match="cannot list the served models"):
        make_backend(down)


def test_agent_openai_backend_runs_an_episode_against_moonlet_serve(servers):
    from moonlet.agent.backends import OpenAIBackend
    from moonlet.agent.loop import Agent
    from moonlet.agent.tools import calculator

    backend = OpenAIBackend(servers["scripted"] + "/v1", "unused")
    res = Agent(backend, [calculator]).run("What is 6*7? Use the calculator.")
    # the second scripted turn only matches when the calculator's real result (42) came back in the prompt
    assert res.stop_reason == "answer" and res.answer == "The answer is 42." and res.tool_calls == 1
    assert res.usage["reasoning_tokens"] > 0 and res.steps == 2


def test_a_server_bug_is_a_json_500_and_the_server_keeps_serving(tmp_path, monkeypatch):
    """In process, with a bug planted in prompt building: the openai client gets an error object (a dropped
    connection would make it retry), and the next request is served."""
    import moonlet.server as server_mod

    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    srv = server_mod.make_server("tiny", port=0, script=str(script))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="x", max_retries=0)
        real_build = server_mod.build_prompt

        def buggy(*a, **kw):
            raise KeyError("planted")

        monkeypatch.setattr(server_mod, "build_prompt", buggy)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="tiny", messages=user("hi"))
        assert e.value.status_code == 500 and e.value.body["code"] == "internal_error"
        assert "KeyError" in e.value.body["message"]
        monkeypatch.setattr(server_mod, "build_prompt", real_build)
        r = client.chat.completions.create(model="tiny", messages=user("hi"))
        assert r.choices[0].message.content == "Hello! How can I help?"
    finally:
        srv.shutdown()
        srv.server_close()
        srv.engine.stop()
