"""`moonlet bench serve`: many concurrent streaming clients against `moonlet serve`, and the same requests
straight into an in-process Engine as the peer (what HTTP + SSE + parsing cost). Also the helper that starts
a `moonlet serve` subprocess on 127.0.0.1 for this bench and for the server tests."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any


def spawn_server(args: list[str], timeout: float = 120.0) -> tuple[Any, str]:
    """Start `moonlet serve ARGS --port 0` as a subprocess on 127.0.0.1; returns (process, base URL) once it
    listens. Its output is drained in the background (the tail is kept in `process.log` for error messages)."""
    import collections
    import subprocess

    cmd = [sys.executable, "-m", "moonlet.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    proc.log = collections.deque(maxlen=200)
    ready: dict = {}
    event = threading.Event()

    def drain() -> None:
        for line in proc.stdout:
            proc.log.append(line)
            if "on http://" in line and not event.is_set():
                ready["url"] = line.split("on ", 1)[1].split()[0]
                event.set()
        event.set()

    threading.Thread(target=drain, daemon=True).start()
    if not event.wait(timeout) or "url" not in ready:
        stop_server(proc)
        raise RuntimeError(f"moonlet serve {' '.join(args)} did not start within {timeout:.0f} s:\n"
                           + "".join(proc.log)[-3000:])
    return proc, ready["url"]


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except Exception:
        proc.kill()
        proc.wait(10)


def _bench_one(base: str, body: bytes, headers: dict, timeout: float) -> tuple[float, float, int]:
    """One streamed request over a fresh connection -> (latency s, time to first token s, completion tokens)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", u.path.rstrip("/") + "/chat/completions", body, headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        ttft, tokens, done = None, 0, False
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if ttft is None and any(c["delta"].get("content") or c["delta"].get("reasoning_content")
                                    or c["delta"].get("tool_calls") for c in chunk["choices"]):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        latency = time.perf_counter() - t0
        return latency, latency if ttft is None else ttft, tokens
    finally:
        conn.close()


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (Linux /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _engine_peer(model: str, bodies: list[bytes], concurrency: int) -> tuple[float, float]:
    """(completion tokens/s, CPU seconds) of the bench's requests submitted straight to an in-process Engine."""
    import moonlet
    from moonlet import chat
    from moonlet.engine import Engine, SamplingParams
    from moonlet.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    engine = Engine(moonlet.load(model), tok, max_batch_size=concurrency).start()
    try:
        jobs = [(chat.render_ids(b["messages"], tok, add_generation_prompt=True)[0],
                 SamplingParams(temperature=b["temperature"], seed=b["seed"], max_tokens=b["max_tokens"],
                                ignore_eos=b.get("ignore_eos", False)))
                for b in map(json.loads, bodies)]
        t0, cpu0 = time.perf_counter(), time.process_time()
        reqs = [engine.submit(ids, params) for ids, params in jobs]
        tokens = sum(r.result().usage["completion_tokens"] for r in reqs)
        return tokens / (time.perf_counter() - t0), time.process_time() - cpu0
    finally:
        engine.stop()


def cli_bench_serve(argv: list[str]) -> int:
    from concurrent.futures import ThreadPoolExecutor

    p = argparse.ArgumentParser(prog="moonlet bench serve", description=(
        "Load test: N concurrent streaming clients send chat completions to `moonlet serve` (a local server "
        "started on 127.0.0.1 unless --base-url is given). Reports failures, p50/p99 latency and time to "
        "first token, and completion tokens/s."))
    p.add_argument("--base-url", help="an existing server's /v1 URL (default: start one with --model)")
    p.add_argument("--model", default="tiny", help="model for the local server (default: the tiny preset)")
    p.add_argument("--api-key", help="Bearer token for --base-url servers that need one")
    p.add_argument("--concurrency", type=int, default=64, help="clients streaming at once (64)")
    p.add_argument("--requests", type=int, default=512, help="requests in total (512)")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--ignore-eos", action="store_true",
                   help="every request generates exactly --max-tokens (vLLM's ignore_eos; the server must support it)")
    p.add_argument("--timeout", type=float, default=600.0, help="overall limit in seconds; unfinished requests fail")
    p.add_argument("--no-engine-peer", dest="engine_peer", action="store_false",
                   help="skip the peer run (the same requests submitted to an in-process engine, no HTTP)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args(argv)
    if a.concurrency < 1 or a.requests < 1:
        p.error("--concurrency and --requests must be >= 1")
    proc = None
    if a.base_url is None:
        proc, a.base_url = spawn_server(["--model", a.model, "--max-batch-size", str(a.concurrency)])
        a.base_url += "/v1"
    headers = {"Content-Type": "application/json"}
    if a.api_key:
        headers["Authorization"] = f"Bearer {a.api_key}"
    try:
        import urllib.request

        with urllib.request.urlopen(urllib.request.Request(a.base_url + "/models", headers=headers), timeout=30) as r:
            model = json.load(r)["data"][0]["id"]
        extra = {"ignore_eos": True} if a.ignore_eos else {}
        bodies = [json.dumps({"model": model, "max_tokens": a.max_tokens, "stream": True,
                              "stream_options": {"include_usage": True}, "temperature": 1.0, "seed": i,
                              "messages": [{"role": "user", "content": f"Request {i}: tell me about the number {i}."}]
                              } | extra).encode() for i in range(a.requests)]
        deadline = time.monotonic() + a.timeout
        results, errors = [], []

        def one(body: bytes):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("bench --timeout reached before this request started")
            return _bench_one(a.base_url, body, headers, left)

        t0, client_cpu0 = time.perf_counter(), time.process_time()
        server_cpu0 = _cpu_seconds(proc.pid) if proc is not None else None
        with ThreadPoolExecutor(a.concurrency) as pool:
            for f in [pool.submit(one, b) for b in bodies]:
                try:
                    results.append(f.result())
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}")
        wall, client_cpu = time.perf_counter() - t0, time.process_time() - client_cpu0
        server_cpu = _cpu_seconds(proc.pid) if server_cpu0 is not None else None
        server_cpu = None if server_cpu is None else server_cpu - server_cpu0
    finally:
        if proc is not None:
            stop_server(proc)
    peer = _engine_peer(a.model, bodies, a.concurrency) if proc is not None and a.engine_peer else None
    q = lambda xs, p: round(sorted(xs)[min(len(xs) - 1, int(p * len(xs)))], 4) if xs else None
    lat, ttft, toks = [r[0] for r in results], [r[1] for r in results], sum(r[2] for r in results)
    out = {"bench": "serve", "model": model, "base_url": a.base_url if proc is None else "local", "requests": a.requests,
           "concurrency": a.concurrency, "max_tokens": a.max_tokens, "ok": len(results), "failed": len(errors),
           "wall_s": round(wall, 3), "latency_p50_s": q(lat, 0.5), "latency_p99_s": q(lat, 0.99),
           "ttft_p50_s": q(ttft, 0.5), "ttft_p99_s": q(ttft, 0.99), "completion_tokens": toks,
           "tokens_per_s": round(toks / wall, 1), "requests_per_s": round(len(results) / wall, 2),
           # CPU seconds during the run: the clients share this machine's cores with the server
           "client_cpu_s": round(client_cpu, 2), "server_cpu_s": None if server_cpu is None else round(server_cpu, 2),
           "first_errors": errors[:3]}
    if peer is not None:  # the same requests straight into an in-process engine: what HTTP + SSE cost
        out |= {"engine_tokens_per_s": round(peer[0], 1), "engine_cpu_s": round(peer[1], 2),
                "server_vs_engine": round(out["tokens_per_s"] / peer[0], 3)}
    if not a.json:
        print(f"{len(results)}/{a.requests} ok, p50 {out['latency_p50_s']} s, p99 {out['latency_p99_s']} s, "
              f"{out['tokens_per_s']} tokens/s")
    print(json.dumps(out))
    return 1 if errors else 0
