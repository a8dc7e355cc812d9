"""`moonlet serve`: an OpenAI-compatible server for K2 Thinking models, plus a web chat page.

Standard library HTTP (ThreadingHTTPServer, one thread per connection) in front of one shared Engine that
batches every request (continuous batching). A request's path:

    JSON body -> validate (4xx OpenAI error objects for bad input) -> chat.render_ids (K2 template)
    -> engine.submit per choice -> token ids -> chat.StreamParser -> OpenAI message / SSE chunk deltas

POST /v1/completions is the legacy text endpoint (vLLM's benchmarks and raw-prompt clients use it): the prompt
is the model's input as given (text with special tokens, or token ids, or a batch of them) and the choice is
the generated text, with no template and no parser.

A connection's thread reads the request and answers it, except for the body of an event stream: that is
written by one SSE writer thread for all streams (the engine tells it which requests have new tokens), so
the cost per token does not grow with the number of threads waiting on the engine.

Reasoning goes out as both `reasoning_content` (Moonshot, older vLLM) and `reasoning` (newer vLLM), and
comes back in either field on assistant messages. Beyond OpenAI's fields a request may send (as the openai
client's `extra_body`) `top_k`, `max_thinking_tokens` (the engine forces `</think>` at that many reasoning
tokens) and vLLM's `ignore_eos` (only max_tokens and `stop` strings end the turn, not even a tool section
when no tools are declared: for benchmarks and load tests).

Tool calls stream as OpenAI deltas: the first delta of a call carries index/id/name, then argument fragments.
A client that goes away (socket EOF, seen by one poll thread, or a failed write) cancels its engine requests,
which frees their batch slots at the next step.

`--script FILE` is a TESTING AID (moonlet.scripted): it replaces the model by a replay of given K2-format
completions, so the protocol paths run end to end without a trained model. It proves no model capability.
"""

from __future__ import annotations

import argparse
import hmac
import json
import mimetypes
import os
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from moonlet.openai_api import (
    ADJUSTMENTS,
    APIError,
    Choice,
    TextChoice,
    build_prompt,
    completion_prompts,
    detokenize,
    tokenize,
    usage_of,
    validate,
    validate_completion,
    vllm_prompt_logprobs,
)
from moonlet.scripted import ScriptedEngine
from moonlet.sse import CLIENT_TIMEOUT_S, SSEWriter, Stream

WEB_DIR = Path(__file__).parent / "web"
MAX_BODY = 64 << 20
# ------------------------------------------------------------------------------------------------ metrics

class Metrics:
    """Counters and latency histograms, rendered in Prometheus' text format at GET /metrics."""

    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[str, float] = {}
        self.running = 0
        self.engine_busy = None  # engine.has_work, when the engine has it: 0 means every slot is free
        self.hist = {k: [0] * (len(self.BUCKETS) + 1) + [0.0] for k in ("request_latency", "time_to_first_token")}

    def inc(self, name: str, v: float = 1) -> None:
        with self.lock:
            self.counters[name] = self.counters.get(name, 0) + v

    def observe(self, name: str, seconds: float) -> None:
        with self.lock:
            h = self.hist[name]
            h[next((i for i, b in enumerate(self.BUCKETS) if seconds <= b), len(self.BUCKETS))] += 1
            h[-1] += seconds

    def render(self) -> str:
        lines = []
        with self.lock:
            lines += ["# TYPE moonlet_requests_running gauge", f"moonlet_requests_running {self.running}"]
            if self.engine_busy is not None:
                lines += ["# TYPE moonlet_engine_busy gauge", f"moonlet_engine_busy {int(self.engine_busy())}"]
            typed = set()
            for name in sorted(self.counters):
                base = name.split("{")[0]
                if base not in typed:
                    typed.add(base)
                    lines.append(f"# TYPE moonlet_{base} counter")
                lines.append(f"moonlet_{name} {self.counters[name]:g}")
            for name, h in self.hist.items():
                lines.append(f"# TYPE moonlet_{name}_seconds histogram")
                cum = 0
                for b, c in zip((*map(str, self.BUCKETS), "+Inf"), h[:-1]):
                    cum += c
                    lines.append(f'moonlet_{name}_seconds_bucket{{le="{b}"}} {cum}')
                lines += [f"moonlet_{name}_seconds_sum {h[-1]:.6f}", f"moonlet_{name}_seconds_count {cum}"]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- disconnect watcher

class DisconnectWatcher(threading.Thread):
    """One thread polls the sockets of in-flight requests; EOF or an error means the client is gone, and the
    request's engine work is cancelled even while it waits in the queue (before any token is written)."""

    def __init__(self):
        super().__init__(daemon=True, name="moonlet-disconnects")
        self.lock = threading.Lock()
        self.watched: dict[int, tuple[socket.socket, Any]] = {}

    def watch(self, sock: socket.socket, on_gone) -> None:
        with self.lock:
            self.watched[sock.fileno()] = (sock, on_gone)

    def unwatch(self, sock: socket.socket, entry: tuple | None = None) -> None:
        with self.lock:
            fd = sock.fileno()
            if entry is None or self.watched.get(fd) is entry:  # not a newer request on the same connection
                self.watched.pop(fd, None)

    def run(self) -> None:
        while True:
            with self.lock:
                items = dict(self.watched)
            if not items:
                time.sleep(0.1)
                continue
            poller = select.poll()
            for fd in items:
                poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
            for fd, _ in poller.poll(100):
                sock, on_gone = entry = items[fd]
                try:
                    gone = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                self.unwatch(sock, entry)  # gone, or a pipelined next request: either way stop polling it
                if gone:
                    on_gone()
            time.sleep(0.05)


# ------------------------------------------------------------------------------------------------- server


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True

    def __init__(self, addr, engine, tokenizer, model_name: str, max_model_len: int, api_key: str | None,
                 default_max_tokens: int = 16384):
        super().__init__(addr, Handler)
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_model_len, self.api_key, self.default_max_tokens = max_model_len, api_key, default_max_tokens
        self.metrics, self.watcher, self.created = Metrics(), DisconnectWatcher(), int(time.time())
        self.metrics.engine_busy = getattr(engine, "has_work", None)
        self.writer = SSEWriter(self.metrics)
        self.watcher.start()
        self.writer.start()

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (a reset keep-alive connection, a broken pipe mid-stream) is routine, not a
        server error: it is counted, without socketserver's traceback on stderr for each one."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            self.metrics.inc("client_disconnects_total")
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT_S  # seconds a socket read or write may block: idle keep-alive connections and stalled readers
    server: Server

    def log_message(self, fmt: str, *args) -> None:  # quiet: the metrics endpoint tells the story
        pass

    # --- plumbing --------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str = "application/json", extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection:  # say so: a client that pools the connection would send the next request into it
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # HEAD: the headers GET would send (health checks, curl -I)
            self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, e: APIError) -> None:
        self.server.metrics.inc(f'requests_total{{status="{e.status}"}}')
        extra = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        self._send(e.status, json.dumps(e.body()).encode(), extra=extra)

    def _auth(self) -> None:
        key = self.server.api_key
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        if key and not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())):
            raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>' matching "
                           "the server's --api-key", None, "invalid_api_key")

    # --- routes ----------------------------------------------------------------------------------
    def _not_allowed(self) -> None:
        self.close_connection = True  # a body, if any, is left unread
        self._error(APIError(405, f"method {self.command} is not allowed; moonlet serves GET and POST", None,
                             "method_not_allowed"))

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_allowed

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            self._read_body()  # a GET may carry one: unread, it would be parsed as the next request
            if path == "/health":
                return self._json(200, {"status": "ok"})
            if path == "/metrics":
                return self._send(200, self.server.metrics.render().encode(), "text/plain; version=0.0.4")
            if path.startswith("/v1/"):
                self._auth()
                card = {"id": self.server.model_name, "object": "model", "created": self.server.created,
                        "owned_by": "moonlet", "max_model_len": self.server.max_model_len}
                if path == "/v1/models":
                    return self._json(200, {"object": "list", "data": [card]})
                if path == f"/v1/models/{self.server.model_name}":
                    return self._json(200, card)
                raise APIError(404, f"no route GET {path}", None, "not_found")
            self._static(path)
        except APIError as e:
            self._error(e)

    def _static(self, path: str) -> None:
        rel = "index.html" if path in ("/", "") else path.lstrip("/")
        file = None if "\0" in rel else (WEB_DIR / rel).resolve()  # (resolve() raises on a NUL byte)
        if file is None or WEB_DIR.resolve() not in file.parents or not file.is_file():
            raise APIError(404, f"no route GET {path}", None, "not_found")
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(200, file.read_bytes(), ctype, {"Cache-Control": "no-cache"})

    def _read_body(self, required: bool = False) -> bytes:
        """The request body, read before any reply so that a kept-alive connection stays in sync."""
        values = set(self.headers.get_all("Content-Length") or [])
        if not values and not required and "Transfer-Encoding" not in self.headers:
            return b""
        n = int(next(iter(values))) if len(values) == 1 and next(iter(values)).strip().isdigit() else -1
        if 0 <= n <= MAX_BODY:
            return self.rfile.read(n)
        self.close_connection = True  # the body cannot be skipped: answer, then close the connection
        if len(values) > 1:  # RFC 9112 6.3: a message framed two ways is refused (request smuggling)
            raise APIError(400, "conflicting Content-Length headers")
        if n < 0:
            raise APIError(411, "a Content-Length header is required")
        raise APIError(413, f"request body of {n} bytes is over the {MAX_BODY}-byte limit")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        t0 = time.monotonic()
        try:
            raw = self._read_body(required=True)
            self._auth()
            if path not in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
                raise APIError(404, f"no route POST {path}; moonlet serves POST /v1/chat/completions, "
                               "/v1/completions, /tokenize and /detokenize", None, "not_found")
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:  # RecursionError: nested too deep to parse
                raise APIError(400, f"request body is not valid JSON: {e}", None, "invalid_json") from e
            s = self.server
            if path == "/tokenize":  # vLLM's: what a client counts its context with
                return self._json(200, tokenize(body, s.model_name, s.tokenizer, s.max_model_len))
            if path == "/detokenize":
                return self._json(200, detokenize(body, s.model_name, s.tokenizer))
            if path == "/v1/chat/completions":
                req = validate(body, s.model_name, s.max_model_len, s.default_max_tokens)
                prompt, prefix = build_prompt(req, s.tokenizer, s.max_model_len)
                prompts, choose = [prompt], self._chat_choice(req, prefix)
            else:
                req = validate_completion(body, s.model_name, s.max_model_len)
                prompts = completion_prompts(req, s.tokenizer, s.max_model_len)
                choose = lambda i, r: TextChoice(i, r, s.tokenizer, req["echo"], req["return_token_ids"])
        except APIError as e:
            return self._error(e)
        except Exception as e:
            return self._error(self._internal_error(e))
        self._complete(req, prompts, choose, t0)

    def _chat_choice(self, req: dict, prefix: list[int]):
        """The chat route's engine settings: a forced prefix (tool_choice) and, when the model may call no tool,
        the tool section's marker as a stop token (it ends the turn)."""
        from moonlet.chat import SECTION_BEGIN

        no_tools = not req["tools"] or req["tool_choice"] == "none"
        req["stop_token_ids"] = (self.server.tokenizer.special[SECTION_BEGIN],) if no_tools and not req["ignore_eos"] else ()
        if prefix:
            req["max_thinking_tokens"] = None  # a forced call carries no reasoning
        return lambda i, r: Choice(i, r, self.server.tokenizer, prefix, req["parallel_tool_calls"],
                                   req["return_token_ids"])

    def _internal_error(self, e: Exception) -> APIError:
        """A bug, not bad input: the traceback goes to the log and the client still gets an OpenAI error
        object (a dropped connection makes the openai client retry the same request)."""
        traceback.print_exc()
        self.close_connection = True
        return APIError(500, f"internal server error ({type(e).__name__}: {e})", None, "internal_error",
                        "server_error")

    # --- generation ------------------------------------------------------------------------------
    def _submit(self, req: dict, prompts: list[list[int]], choose, listener) -> list[Choice | TextChoice]:
        """n engine requests per prompt; choice i = prompt * n + j, seeded seed + i."""
        from moonlet.engine import SamplingParams

        choices: list[Choice | TextChoice] = []
        try:
            for i, prompt in enumerate(p for p in prompts for _ in range(req["n"])):
                seed = None if req["seed"] is None else req["seed"] + i
                params = SamplingParams(temperature=req["temperature"], top_p=req["top_p"], top_k=req["top_k"],
                                        seed=seed, max_tokens=req["max_tokens"], stop=req["stop"],
                                        stop_token_ids=req["stop_token_ids"], ignore_eos=req["ignore_eos"],
                                        logprobs=req["logprobs"], prompt_logprobs=req["prompt_logprobs"],
                                        max_thinking_tokens=req["max_thinking_tokens"],
                                        **{k: req[k] for k in ADJUSTMENTS})
                choices.append(choose(i, self.server.engine.submit(prompt, params, listener)))
        except BaseException:
            for c in choices:
                c.request.cancel()
            raise
        return choices

    def _complete(self, req: dict, prompts: list[list[int]], choose, t0: float) -> None:
        s, m = self.server, self.server.metrics
        stream = Stream(s.writer, self.connection, req["include_usage"], t0, req["n"]) if req["stream"] else None
        try:
            choices = self._submit(req, prompts, choose, stream and stream.listener)
        except (ValueError, RuntimeError) as e:  # the engine refused it (e.g. a script without a match)
            return self._error(APIError(400, f"the engine refused the request: {e}", None, "engine_refused"))
        cancel = lambda: [c.request.cancel() for c in choices]
        with m.lock:
            m.running += 1
        s.watcher.watch(self.connection, cancel)
        status = "200"
        try:
            if stream is not None:
                stream.choices = choices
                self._stream(stream)
            else:
                self._wait(req, choices, t0)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            status = "client_gone"
            cancel()
            self.close_connection = True
        except Exception as e:
            status = "500"
            cancel()
            err = self._internal_error(e)
            if stream is None:  # (a stream's 200 head may be out already: that connection just ends)
                self._send(500, json.dumps(err.body()).encode())
        except BaseException:
            status = "500"
            cancel()
            raise
        finally:
            s.watcher.unwatch(self.connection)
            if status != "200":  # wait (briefly) for the engine to drop the cancelled work, so metrics are true
                for c in choices:
                    try:
                        c.request.result(timeout=10)
                    except TimeoutError:
                        pass
            with m.lock:
                m.running -= 1
            reasons = {c.request.finish_reason for c in choices}
            status = "cancelled" if "cancelled" in reasons else "500" if "error" in reasons else status
            m.inc(f'requests_total{{status="{status}"}}')
            m.observe("request_latency", time.monotonic() - t0)
            if status == "200":
                u = usage_of([c.request for c in choices], req["n"])
                m.inc("prompt_tokens_total", u["prompt_tokens"])
                m.inc("cached_prompt_tokens_total", u["prompt_tokens_details"]["cached_tokens"])
                m.inc("completion_tokens_total", u["completion_tokens"])
                m.inc("reasoning_tokens_total", u["completion_tokens_details"]["reasoning_tokens"])

    def _header(self, obj: str, cid: str) -> dict:
        return {"id": cid, "object": obj, "created": int(time.time()), "model": self.server.model_name,
                "system_fingerprint": "moonlet"}

    def _wait(self, req: dict, choices: list[Choice | TextChoice], t0: float) -> None:
        for c in choices:
            c.request.result()
            for tok in c.request.output_ids:
                c.feed(tok)
            c.finish()
        if choices[0].request.ttft is not None:
            self.server.metrics.observe("time_to_first_token", choices[0].request.ttft)
        if any(c.request.finish_reason == "error" for c in choices):  # (counted by _complete, not _error)
            err = APIError(500, "the engine failed while generating", None, "engine_error", "server_error")
            return self._send(500, json.dumps(err.body()).encode())
        if any(c.request.finish_reason == "cancelled" for c in choices):
            return
        out = self._header(choices[0].OBJECT, choices[0].ID_PREFIX + uuid.uuid4().hex)
        out["choices"] = [c.result() for c in choices]
        k = req["vllm_prompt_logprobs"]
        if k is not None:  # vLLM's shape and place: in each choice of /v1/completions, once in a chat response
            scored = zip(out["choices"], choices) if choices[0].PROMPT_IN_CHOICE else [(out, choices[0])]
            for obj, c in scored:
                obj["prompt_logprobs"] = vllm_prompt_logprobs(c.request, self.server.tokenizer, k)
        if req["return_token_ids"] and not choices[0].PROMPT_IN_CHOICE:
            out["prompt_token_ids"] = list(choices[0].request.prompt_ids)
        out["usage"] = usage_of([c.request for c in choices], req["n"])
        self._json(200, out)

    def _stream(self, stream: Stream) -> None:
        """Send the head of the event stream from this thread, then hand the socket to the SSE writer and sleep
        until it has written the end (or found the client gone)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if self.request_version == "HTTP/1.0":  # no chunked encoding there: the close ends the stream
            stream.chunked, self.close_connection = False, True
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        first = stream.choices[0]
        stream.head = self._header(first.CHUNK_OBJECT, first.ID_PREFIX + uuid.uuid4().hex)
        prompt_ids = None if first.PROMPT_IN_CHOICE or not first.return_token_ids else \
            {"prompt_token_ids": list(first.request.prompt_ids)}  # chat: once, on the stream's first chunk
        for c in stream.choices:
            for d in c.opening():
                stream.send(c.index, c.chunk(d), prompt_ids)
                prompt_ids = None
        self.server.writer.hand_over(stream)
        stream.done.wait()
        self.connection.settimeout(self.timeout)
        if stream.gone is not None:
            raise stream.gone


# ------------------------------------------------------------------------------------------------- CLI

def make_server(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
                device: str = "cpu", dtype: str = "auto", max_model_len: int | None = None,
                max_batch_size: int = 64, default_max_tokens: int = 16384, script: str | None = None,
                script_delay: float = 0.0, served_model_name: str | None = None, compile: bool = False) -> Server:
    """Load the model (or the scripted testing aid), start the engine, bind the HTTP server (not yet serving).
    dtype "auto": bfloat16 on CUDA, float32 on the CPU."""
    import torch

    from moonlet.checkpoint import model_dir
    from moonlet.tokenizer import load_tokenizer

    name = served_model_name or (Path(model).name if Path(model).is_dir() else model)
    model = model_dir(model)  # a checkpoint, a preset or a training run; else an error about the model
    tokenizer = load_tokenizer(model)
    if script:
        engine = ScriptedEngine(tokenizer, json.loads(Path(script).read_text()), script_delay)
        limit = max_model_len or 32768
    else:
        import moonlet
        from moonlet.checkpoint import default_dtype
        from moonlet.engine import Engine

        net = moonlet.load(model, device=device,
                           dtype=default_dtype(device) if dtype == "auto" else getattr(torch, dtype))
        if max_model_len is not None and max_model_len > net.cfg.max_position_embeddings:
            raise ValueError(f"--max-model-len {max_model_len} is over the model's max_position_embeddings "
                             f"({net.cfg.max_position_embeddings})")
        # no --max-model-len: the engine sizes the context per slot from its KV cache budget
        engine = Engine(net, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_model_len, device=device,
                        compile=compile or None)
        limit = engine.max_seq_len
    engine.start()
    try:
        return Server((host, port), engine, tokenizer, name, limit, api_key, default_max_tokens)
    except OSError as e:  # port taken, address not ours: stop the engine thread, say which address
        engine.stop()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def cli_serve(argv: list[str]) -> int:
    from moonlet.cli import at_least
    from moonlet.generate import COMPILE_HELP

    p = argparse.ArgumentParser(prog="moonlet serve", description=(
        "OpenAI-compatible server (POST /v1/chat/completions with reasoning, tools and streaming; POST "
        "/v1/completions for raw text or token prompts; GET /v1/models, /health, /metrics) and a web chat page "
        "at /. All requests share one engine with continuous batching."))
    p.add_argument("--model", required=True, help="checkpoint directory, or a preset name (random weights)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=at_least(0, 65535), default=8000, help="port (0 picks a free one; the URL is printed)")
    p.add_argument("--api-key", default=os.environ.get("MOONLET_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MOONLET_API_KEY, else open)")
    p.add_argument("--served-model-name", help="the model id clients send (default: preset or directory name)")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu", help="cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations dtype (auto: bfloat16 on cuda, float32 on cpu; on cpu, bfloat16 "
                   "runs INT4 experts in torch's int4 kernel: 3-5x the float32 fallback for experts the size of the "
                   "small preset's, no gain for tiny ones)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--max-model-len", type=at_least(1), help="context limit in tokens (default: the model's)")
    p.add_argument("--max-batch-size", type=at_least(1), default=64, help="engine slots decoded together")
    p.add_argument("--default-max-tokens", type=at_least(1), default=16384,
                   help="completion budget when a request sends no max_tokens (reasoning shares it)")
    p.add_argument("--script", help="TESTING AID: replay the K2-format completions in this JSON file instead "
                   "of running the model (exercises tokenizer, parser and SSE; proves no model capability)")
    p.add_argument("--script-delay", type=float, default=0.0, help="seconds between scripted tokens")
    a = p.parse_args(argv)
    try:
        server = make_server(a.model, a.host, a.port, a.api_key, device=a.device, dtype=a.dtype,
                             max_model_len=a.max_model_len, max_batch_size=a.max_batch_size,
                             default_max_tokens=a.default_max_tokens, script=a.script,
                             script_delay=a.script_delay, served_model_name=a.served_model_name,
                             compile=a.compile)
    except (OSError, ValueError, RuntimeError) as e:  # bad --model / --script / port: say which, no traceback
        print(f"moonlet serve: {e}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"moonlet serve: {server.model_name} on http://{host}:{port} (chat UI at /, API at /v1)", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.engine.stop()
    return 0


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False

