"""The event streams of `moonlet serve`: one SSE writer thread for every streamed response. The engine tells
it (a listener, on the engine thread) which requests released tokens; once per engine step it parses each
stream's new tokens into OpenAI chunks and gives each socket its bytes in one non-blocking send, so the cost
per token does not grow with the number of connections. A client that stops reading keeps its bytes here and
is dropped after the handler's timeout without progress; the other streams go on meanwhile."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import traceback
from typing import TYPE_CHECKING

from moonlet.openai_api import Choice, TextChoice, usage_of

if TYPE_CHECKING:
    from moonlet.server import Metrics

CLIENT_TIMEOUT_S = 300  # a client that reads nothing for this long is dropped (the server's socket timeout too)


class Stream:
    """One streamed response: its choices, the bytes not yet sent, and where each choice's tokens were read."""

    def __init__(self, writer: SSEWriter, sock: socket.socket, include_usage: bool, t0: float, n: int = 1):
        self.writer, self.sock, self.include_usage, self.t0, self.n = writer, sock, include_usage, t0, n
        self.choices: list[Choice | TextChoice] = []
        self.head: dict = {}
        self._head_json: str | None = None
        self.out = bytearray()
        self.done, self.gone = threading.Event(), None  # gone: the OSError that ended a write
        self.started, self.ending, self.first = False, False, True
        self._read: dict[int, int] = {}  # choice index -> tokens of its request already parsed
        self._live: set[int] = set()
        self.last_progress = time.monotonic()
        self.chunked = True  # HTTP/1.1; an HTTP/1.0 client gets the raw events and the connection's close ends them

    def listener(self, request) -> None:  # on the engine thread: only say there is news
        self.writer.news.put(self)

    def start(self) -> None:
        """The handler has written the head: from now on the writer owns the socket (non-blocking)."""
        self.sock.setblocking(False)
        self._read = {c.index: 0 for c in self.choices}
        self._live = set(self._read)
        self.started = True

    def _event(self, data: bytes) -> None:  # one SSE event as one HTTP chunk
        data = b"data: " + data + b"\n\n"
        self.out += b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data

    def sse(self, obj: dict | str) -> None:
        self._event(obj.encode() if isinstance(obj, str) else json.dumps(obj).encode())

    def send(self, index: int, choice: str, extra: dict | None = None) -> None:
        """The chunk head | extra | {"choices": [{"index": index, <choice>}]}, with the head's JSON built once per
        stream (it was a third of the writer's time per token); `choice` is the JSON Choice.chunk wrote."""
        if self._head_json is None:
            self._head_json = json.dumps(self.head)[:-1] + ', "choices": [{"index": '
        head = self._head_json if not extra else json.dumps(self.head | extra)[:-1] + ', "choices": [{"index": '
        self._event(f'{head}{index}, {choice}}}]}}'.encode())

    def advance(self, metrics: Metrics) -> None:
        """Parse every choice's new tokens into SSE chunks; after the last choice ends, the stream's tail."""
        if self.ending:
            return
        for c in self.choices:
            if c.index not in self._live:
                continue
            r = c.request
            finished = r.finished  # read before the tokens: a finished request has all of them
            base = self._read[c.index]
            new = r.output_ids[base:]
            self._read[c.index] += len(new)
            if new and self.first:
                metrics.observe("time_to_first_token", time.monotonic() - self.t0)
                self.first = False
            for end, tok in enumerate(new, base + 1):  # a token's logprob rides on the first chunk at or after it
                for d in c.feed(tok):
                    self.send(c.index, c.chunk(d, end=end))
            if finished:
                self._live.discard(c.index)
                for d in c.finish():
                    self.send(c.index, c.chunk(d, end=len(r.output_ids)))
                self.send(c.index, c.chunk({}, c.finish_reason(), len(r.output_ids)))
        if self._live:
            return
        requests = [c.request for c in self.choices]
        if any(r.finish_reason == "error" for r in requests):
            self.sse(self.head | {"choices": [], "error": {"message": "the engine failed while generating",
                                                           "type": "server_error", "code": "engine_error"}})
        if self.include_usage:
            self.sse(self.head | {"choices": [], "usage": usage_of(requests, self.n)})
        self.sse("[DONE]")
        if self.chunked:
            self.out += b"0\r\n\r\n"
        self.ending = True

    def flush(self) -> bool:
        """Write what the socket takes without blocking; True once the stream is over (sent, or client gone)."""
        try:
            while self.out:
                n = self.sock.send(self.out)
                del self.out[:n]
                self.last_progress = time.monotonic()
        except BlockingIOError:
            if time.monotonic() - self.last_progress > CLIENT_TIMEOUT_S:
                return self.end(TimeoutError(f"client read nothing for {CLIENT_TIMEOUT_S} s"))
            return False
        except OSError as e:
            return self.end(e)
        return self.end() if self.ending else False

    def end(self, gone: OSError | None = None) -> bool:
        self.gone = gone
        if gone is not None:
            for c in self.choices:
                c.request.cancel()
        self.done.set()
        return True


class SSEWriter(threading.Thread):
    """One thread writes every streamed response. The engine's listener only queues the stream that has news;
    this thread parses the new tokens of all queued streams and gives each socket its chunks in one
    non-blocking send. So 64 streams cost one wake-up per engine step, instead of 64 handler threads each
    waking and trading the GIL with the engine loop once per token (measured: the server then used 2-3x the
    engine's CPU time). A socket that is full keeps its bytes here and is retried every 20 ms."""

    def __init__(self, metrics: Metrics):
        super().__init__(daemon=True, name="moonlet-sse")
        self.metrics, self.news = metrics, queue.SimpleQueue()
        self.blocked: set[Stream] = set()

    def hand_over(self, stream: Stream) -> None:
        stream.start()
        self.news.put(stream)

    def run(self) -> None:
        while True:
            try:
                ready = {self.news.get(timeout=0.02 if self.blocked else None)}
            except queue.Empty:
                ready = set()
            while True:  # everything that happened since: one engine step releases tokens to many streams
                try:
                    ready.add(self.news.get_nowait())
                except queue.Empty:
                    break
            ready = {s for s in ready if s.started}  # news before hand_over: its thread still writes the head
            for s in ready:
                if not s.done.is_set():
                    try:
                        s.advance(self.metrics)
                    except Exception as e:  # a bug in one stream must not stop the others
                        traceback.print_exc()
                        s.out.clear()
                        s.end(OSError(f"stream failed: {e}"))
            for s in ready | self.blocked:
                if s.done.is_set() or s.flush():
                    self.blocked.discard(s)
                elif s.out:
                    self.blocked.add(s)
                else:
                    self.blocked.discard(s)
