"""The engine on the command line: `moonlet generate` (streams to the terminal) and the engine benchmarks
`moonlet bench decode` (moonlet vs HF transformers `generate` on the same weights, in one process) and
`moonlet bench prefix-cache` (time to first token with and without a prefix-cache hit)."""

from __future__ import annotations

import argparse
import codecs
import json
import statistics
import sys
import time

import torch

import moonlet
from moonlet.cli import UsageError, at_least
from moonlet.engine import Engine, SamplingParams

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def _device_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """--device (default: cuda if there is one) and --dtype (default: checkpoint.default_dtype)."""
    from moonlet.checkpoint import default_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise UsageError(f"--device {device!r}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: this torch sees no CUDA device (torch {torch.__version__})")
    if args.dtype is None:
        return device, default_dtype(device)
    if args.dtype not in _DTYPES:
        raise UsageError(f"--dtype {args.dtype!r}: choose one of {', '.join(_DTYPES)}")
    return device, _DTYPES[args.dtype]


def _load_model(args: argparse.Namespace):
    """The --threads / --device / --dtype / --model options every command here shares."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = _device_dtype(args)
    from moonlet.checkpoint import model_dir

    args.model = model_dir(args.model)  # a training run: its newest checkpoint (whose tokenizer comes along)
    return moonlet.load(args.model, device=device, dtype=dtype)


COMPILE_HELP = ("torch.compile the decode step (CUDA: the step each CUDA graph captures; CPU: 1.1-1.6x faster "
                "steady-state decode on small models, measured with `bench decode --compile`) after a compile of "
                "10-60 s or more per batch / context bucket: worth it for long runs and servers; same as "
                "MOONLET_COMPILE=1")


def _common(ap: argparse.ArgumentParser, model_default: str | None = None) -> None:
    ap.add_argument("--model", default=model_default, required=model_default is None,
                    help="HF-format checkpoint directory or preset name (random weights)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on cuda, fp32 on cpu; on cpu, "
                    "bf16 runs INT4 experts in torch's int4 kernel: 3-5x the fp32 fallback for experts the size of the small "
                    "preset's, no gain for tiny ones)")
    ap.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads")


# ------------------------------------------------------------------------------------------------------
# moonlet generate


def cli_generate(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="moonlet generate", description="Generate from a prompt, streaming tokens "
                                 "to the terminal. With --chat the prompt is a user message rendered in K2's chat "
                                 "format, and the reasoning is shown apart from the answer.")
    _common(ap)
    ap.add_argument("--prompt", required=True, help="prompt text (a user message with --chat)")
    ap.add_argument("--chat", action="store_true", help="render the K2 chat format; show reasoning and answer")
    ap.add_argument("--system", default=None, help="system message (--chat)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's, else moonlet's)")
    ap.add_argument("--max-tokens", type=at_least(1), default=256, help="completion tokens, reasoning included (256)")
    ap.add_argument("--max-thinking-tokens", type=int, default=None, help="force </think> after this many")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    ap.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this x the most likely "
                    "one (0 = off)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="damp tokens already in the prompt or "
                    "output (HF's; 1.0 = off, 1.1-1.3 typical)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    ap.add_argument("--json", action="store_true", help="print one JSON object (text, usage, speed) last")
    args = ap.parse_args(argv)
    from moonlet.tokenizer import load_tokenizer

    try:  # before the model loads: bad sampling options fail in a second, not after a minute of loading
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                max_tokens=args.max_tokens, max_thinking_tokens=args.max_thinking_tokens,
                                stop=tuple(args.stop), min_p=args.min_p, repetition_penalty=args.repetition_penalty)
        params.validate()
    except ValueError as e:
        ap.error(str(e))
    if not args.prompt and not args.chat:
        ap.error("--prompt is empty")
    model = _load_model(args)
    tok = load_tokenizer(args.tokenizer or args.model)
    if tok.vocab_size > model.cfg.vocab_size:
        print(f"moonlet generate: tokenizer {tok.name!r} has {tok.vocab_size} ids but the model's vocab_size is "
              f"{model.cfg.vocab_size}; pass a matching --tokenizer", file=sys.stderr)
        return 2
    if args.chat:
        from moonlet import chat

        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        prompt, _ = chat.render_ids(messages, tok, add_generation_prompt=True)
    else:
        prompt = tok.encode(args.prompt)
    context = model.cfg.max_position_embeddings
    if len(prompt) + args.max_tokens > context:
        print(f"moonlet generate: the prompt's {len(prompt)} tokens and --max-tokens {args.max_tokens} need "
              f"{len(prompt) + args.max_tokens} positions; the model's context is {context}", file=sys.stderr)
        return 2
    engine = Engine(model, tok, max_batch_size=1, compile=args.compile or None,
                    max_seq_len=min(model.cfg.max_position_embeddings, len(prompt) + args.max_tokens + 1))
    out = sys.stderr if args.json else sys.stdout
    dim, reset = ("\x1b[2m", "\x1b[0m") if out.isatty() else ("", "")
    t0 = time.perf_counter()
    req = engine.submit(prompt, params)
    if args.chat:
        parser = chat.StreamParser(tok)
        section = None

        def show(deltas: list[dict]) -> None:
            nonlocal section
            for d in deltas:
                kind = "reasoning" if "reasoning_content" in d else "answer" if "content" in d else "tool call"
                if kind != section:
                    out.write(f"{reset}\n[{kind}]\n" if section else f"[{kind}]\n")
                    section = kind
                if kind == "reasoning":
                    out.write(dim + d["reasoning_content"])
                elif kind == "answer":
                    out.write(d["content"])
                else:
                    for call in d["tool_calls"]:
                        fn = call.get("function", {})
                        out.write((f"{fn['name']}(" if fn.get("name") else "") + fn.get("arguments", ""))
                out.flush()

        for t in req:
            show(parser.feed_ids(t))
        show(parser.finish())
        out.write(reset + "\n")
    else:
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for t in req:
            out.write(tok.token_bytes(t).decode() if tok.is_special(t) else utf8.decode(tok.token_bytes(t)))
            out.flush()
        out.write(utf8.decode(b"", final=True) + "\n")
    dt = time.perf_counter() - t0
    ttft = req.ttft if req.ttft is not None else dt
    n_decode = req.usage["completion_tokens"] - 1  # tokens after the first, which the prefill produced
    speed = n_decode / (dt - ttft) if n_decode > 0 and dt > ttft else 0.0
    compiled = " (including the decode step's compile: see bench decode --compile)" if \
        "compiled" in engine.decoder.mode else ""
    print(f"[{req.finish_reason}; {req.usage}; first token after {ttft:.2f} s, then {speed:.1f} tokens/s{compiled}]",
          file=sys.stderr)
    if req.error:
        print(f"moonlet generate: the engine failed: {req.error}", file=sys.stderr)
    if args.json:
        result = {"finish_reason": req.finish_reason, "usage": req.usage, "tokens_per_s": round(speed, 2),
                  "ttft_s": round(ttft, 4),
                  "decode": engine.decoder.mode, "output_ids": req.output_ids, "error": req.error}
        # --chat: the parse of the ids the live view showed (a text parse would take text spelling a marker,
        # such as a literal "<|im_end|>", for the marker)
        result |= parser.result() if args.chat else {"text": tok.decode(req.output_ids)}
        print(json.dumps(result))
    return 1 if req.finish_reason == "error" else 0


# ------------------------------------------------------------------------------------------------------
# bench decode


def hf_twin(model):
    """An HF transformers DeepseekV3ForCausalLM sharing `model`'s weights (experts fused as transformers 5
    keeps them), built on the meta device and filled by reference, so both run the same numbers."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = {k: v for k, v in model.cfg.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = DeepseekV3Config(**d)
    with torch.device("meta"):
        hf = DeepseekV3ForCausalLM(config)
    state, sd = {}, model.state_dict()
    for name, t in sd.items():
        if name.endswith("mlp.experts.up_proj"):
            continue
        if name.endswith("mlp.experts.gate_proj"):
            prefix = name[: -len("gate_proj")]
            state[f"model.{prefix}gate_up_proj"] = torch.cat([t, sd[prefix + "up_proj"]], dim=1)
        else:
            state[name if name.startswith("lm_head.") else f"model.{name}"] = t
    hf.load_state_dict(state, strict=True, assign=True)
    dev = next(model.parameters()).device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config).to(dev)  # its buffers are not in the state dict
    meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"hf_twin: tensors left on the meta device: {meta[:5]}")
    return hf.eval()


def decode_bytes_per_step(model, batch: int, context: int) -> int:
    """Bytes a decode step must read: every weight once, except the embedding (batch rows) and the routed
    experts (only those some token picked: E(1 - (1 - k/E)^B) per layer, in expectation), plus the cache."""
    cfg = model.cfg
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    active = E * (1 - (1 - k / E) ** batch) if E else 0
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        nbytes = t.numel() * t.element_size()
        if name.startswith("embed_tokens"):
            total += nbytes // cfg.vocab_size * batch
        elif ".mlp.experts." in name:
            total += int(nbytes / E * active)
        else:
            total += nbytes
    p = next(model.parameters())
    return total + batch * context * cfg.num_hidden_layers * cfg.kv_latent_dim * p.element_size()


def _hbm_bytes_per_s(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bw in (("H200", 4.3e12), ("H100", 3.0e12), ("A100", 1.8e12)):  # measured copy bandwidth
        if key in name:
            return bw
    return None


def _time_engine(engine: Engine, prompts: torch.Tensor, params: SamplingParams, device: torch.device) -> tuple:
    """(seconds, seconds until the last request's first token, requests) of one engine.generate."""
    _sync(device)
    t0 = time.perf_counter()
    reqs = engine.generate(prompts.tolist(), params)
    _sync(device)
    _raise_if_failed(reqs)
    return time.perf_counter() - t0, max(r.t_first_token for r in reqs) - t0, reqs


def _raise_if_failed(reqs: list) -> None:
    """A benchmark must not time a failed generation (nor die on its missing first-token time)."""
    failed = next((r for r in reqs if r.finish_reason == "error"), None)
    if failed is not None:
        raise RuntimeError(f"the engine failed: {failed.error}")


def _time_hf(hf, ids: torch.Tensor, n: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """(seconds, new token ids [B,n]) of one greedy HF generate with its default (dynamic) KV cache."""
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(device)
    return time.perf_counter() - t0, out[:, ids.shape[1] :]


def _hf_forward_agreement(hf, prompts: torch.Tensor, out: torch.Tensor) -> float:
    """Fraction of the generated tokens out [B,N] that are the argmax of one HF forward over prompt + out."""
    with torch.no_grad():
        logits = hf(torch.cat([prompts, out], dim=1)).logits[:, prompts.shape[1] - 1 : -1]
    return round((logits.argmax(-1) == out).float().mean().item(), 4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _identical_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Tokens before the first difference, minimum over rows, of two [B, N] id tensors."""
    rows = zip(a.tolist(), b.tolist())
    return min(next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r)) for r, s in rows)


def _bench_decode_batch(model, hf, prompts: torch.Tensor, N: int, args: argparse.Namespace, dev: torch.device,
                        peak: float | None) -> tuple[dict, float, torch.Tensor]:
    """One batch size of `bench decode`: moonlet (and HF when given), timed alternately, best of each.
    Returns the JSON row, moonlet's best seconds and its greedy ids [B, N]."""
    B, P = prompts.shape
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    engine = Engine(model, None, max_batch_size=B, max_seq_len=P + N + 1, prefix_cache_bytes=0,
                    cuda_graphs=False if args.no_cuda_graphs else None, compile=args.compile or None)
    ids = prompts.to(dev)
    _time_engine(engine, prompts, params, dev)  # warm-up (captures the CUDA graphs it will need)
    hf_error = None
    if hf is not None:
        try:
            _time_hf(hf, ids, 8, dev)  # warm-up
        except Exception as e:  # the peer failing (a version, out of memory) must not cost moonlet's numbers
            hf, hf_error = None, f"{type(e).__name__}: {e}"[:500]
    # timed runs alternate between the two, so load from other processes hits both alike; best of each
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(_time_engine(engine, prompts, params, dev))
        if hf is not None:
            theirs.append(_time_hf(hf, ids, N, dev))
    total, first, reqs = min(ours, key=lambda run: run[0])
    ours_ids = torch.tensor([r.output_ids for r in reqs], device=dev)
    decode_tps = B * (N - 1) / max(total - first, 1e-9)
    gbps = decode_bytes_per_step(model, B, P + N // 2) * decode_tps / B / 1e9
    row = {"batch": B, "moonlet_tokens_per_s": round(B * N / total, 2),
           "moonlet_decode_tokens_per_s": round(decode_tps, 2), "moonlet_ttft_ms": round(first * 1e3, 2),
           "achieved_GBps": round(gbps, 2), "hbm_roofline_fraction": round(gbps * 1e9 / peak, 4) if peak else None,
           "moonlet_decode": engine.decoder.mode}
    del engine
    if args.profile:
        row["profile"] = _profile_decode(model, B, P + N // 2, dev)
    if hf_error:
        row["hf_error"] = hf_error
    if hf is not None:
        hf_time, hf_ids = min(theirs, key=lambda run: run[0])
        row |= {"hf_tokens_per_s": round(B * N / hf_time, 2),
                "speedup_vs_hf": round(hf_time / total, 2),
                # fraction of each row before the first token that differs from HF generate's (min over rows)
                "greedy_tokens_identical_to_hf": _identical_prefix(ours_ids, hf_ids) / N,
                # near-ties in random weights can flip a greedy pick (HF generate's cached decode and HF's
                # own full forward disagree too), so also: the fraction of tokens that are HF's full-forward
                # argmax given the same prefix, for our tokens and for HF generate's
                "greedy_tokens_match_hf_forward": _hf_forward_agreement(hf, ids, ours_ids),
                "hf_generate_tokens_match_hf_forward": _hf_forward_agreement(hf, ids, hf_ids)}
    return row, total, ours_ids


def _profile_decode(model, B: int, context: int, dev: torch.device, steps: int = 8) -> list[dict] | str:
    """The top kernels of `steps` eager decode steps at batch B over `context` cached positions (the cache's
    contents do not change what runs). Eager, so each kernel is seen (and named) outside a CUDA graph."""
    from moonlet.bench import top_kernels
    from moonlet.kvcache import Decoder

    def make_steps():
        cfg, w = model.cfg, model.embed_tokens.weight
        cache = torch.zeros(cfg.num_hidden_layers, B, context + 1, cfg.kv_latent_dim, device=dev, dtype=w.dtype)
        decoder = Decoder(model, cache, use_graphs=False, compile=False)
        tokens = torch.zeros(B, dtype=torch.long, device=dev)
        positions = torch.full((B,), context - 1, dtype=torch.long, device=dev)
        return lambda: [decoder(tokens, positions, context) for _ in range(steps)]

    return top_kernels(make_steps, dev)


def cli_bench_decode(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="moonlet bench decode", description="Greedy decode tokens/s of the moonlet "
                                 "engine, and of HF transformers generate on the same weights (--compare hf), "
                                 "with achieved GB/s and the HBM-roofline fraction on GPU.")
    _common(ap, "tiny")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,16")
    ap.add_argument("--prompt-len", type=at_least(1), default=256, help="random prompt tokens per request (256)")
    ap.add_argument("--new-tokens", type=at_least(2), default=128, help="greedy tokens decoded per request (128; "
                    "decode speed excludes the first)")
    ap.add_argument("--compare", choices=["none", "hf"], default="none", help="hf: also time HF transformers' generate on the same weights in this process")
    ap.add_argument("--quant", default="none", help="none, int4 (moonlet.quant.quantize_model: routed experts "
                    "W4A16), or none,int4: both on the same weights in one run, with int4's speedup over bf16")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="CUDA: run the decode step eagerly")
    ap.add_argument("--compile", action="store_true", help=COMPILE_HELP + "; compiling happens in the untimed "
                    "warm-up")
    ap.add_argument("--repeats", type=at_least(1), default=3, help="timed runs of each side, interleaved; the best counts")
    ap.add_argument("--profile", action="store_true", help="after timing, profile 8 eager decode steps per row: "
                    "the kernels (CPU: ops) that take the time, in the row's \"profile\"")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args(argv)
    quants = args.quant.split(",")
    if any(q not in ("none", "int4") for q in quants) or len(set(quants)) < len(quants):
        ap.error(f"--quant {args.quant!r}: give none, int4 or none,int4")
    quants.sort(key=["none", "int4"].index)  # bf16 first: quantizing replaces the experts in place
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        ap.error(f"--batch {args.batch!r}: give batch sizes >= 1, comma-separated (e.g. 1,16)")
    P, N = args.prompt_len, args.new_tokens
    model = _load_model(args)
    if P + N > model.cfg.max_position_embeddings:
        ap.error(f"--prompt-len {P} + --new-tokens {N} is over the model's context "
                 f"({model.cfg.max_position_embeddings})")
    hf = hf_error = None
    if args.compare == "hf":
        try:
            hf = hf_twin(model)  # HF holds the bf16 weights even after quantization
        except Exception as e:  # report it, and still time moonlet
            hf_error = f"{type(e).__name__}: {e}"[:500]
            print(f"moonlet bench decode: HF transformers model failed: {hf_error}", file=sys.stderr)
    dev = next(model.parameters()).device
    peak = _hbm_bytes_per_s(dev)
    gen = torch.Generator().manual_seed(0)
    prompts = {B: torch.randint(0, model.cfg.vocab_size, (B, P), generator=gen) for B in batches}
    rows, baseline = [], {}  # baseline: batch -> (seconds, output ids) of the unquantized run
    for quant in quants:
        if quant == "int4":
            from moonlet.quant import quantize_model

            model = quantize_model(model)
        for B in batches:
            row, seconds, ids = _bench_decode_batch(model, hf if quant == "none" else None, prompts[B], N, args,
                                                    dev, peak)
            row = {"quant": quant, **row}
            if quant == "none":
                baseline[B] = seconds, ids
            elif B in baseline:
                row["speedup_vs_unquantized"] = round(baseline[B][0] / seconds, 3)
                row["greedy_tokens_identical_to_unquantized"] = _identical_prefix(ids, baseline[B][1]) / N
            rows.append(row)
            print(json.dumps(row), file=sys.stderr if args.json else sys.stdout)
    result = {"bench": "decode", "model": args.model, "device": str(dev), "dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "quant": args.quant, "prompt_len": P, "new_tokens": N,
              "hbm_bytes_per_s": peak, "repeats": args.repeats, "results": rows}
    if hf_error:
        result["hf_error"] = hf_error
    if hf is not None:
        result["hf_attn_implementation"] = hf.config._attn_implementation
        result["hf_experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
        if "int4" in quants:
            from moonlet.kernels.w4a16 import tuned_gemv_tiles

            result["w4a16_gemv_tiles"] = tuned_gemv_tiles()  # the autotuner's pick per (rows, N, K, swiglu)
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------------
# bench prefix-cache


def cli_bench_prefix_cache(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="moonlet bench prefix-cache", description="Time to first token for a "
                                 "prompt whose long prefix is in the prefix cache (hit) vs not (miss).")
    _common(ap, "tiny")
    ap.add_argument("--prefix-len", type=at_least(1), default=2048, help="shared prefix tokens (2048)")
    ap.add_argument("--suffix-len", type=at_least(1), default=32, help="distinct suffix tokens per request (32)")
    ap.add_argument("--repeats", type=at_least(1), default=5, help="timed repetitions; the median is reported (5)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args(argv)
    model = _load_model(args)
    gen = torch.Generator().manual_seed(0)
    V, P, S = model.cfg.vocab_size, args.prefix_len, args.suffix_len
    if P + S + 2 > model.cfg.max_position_embeddings:
        ap.error(f"--prefix-len {P} + --suffix-len {S} (+ 2) is over the model's context "
                 f"({model.cfg.max_position_embeddings})")
    prefix = torch.randint(0, V, (P,), generator=gen).tolist()
    engine = Engine(model, None, max_batch_size=1, max_seq_len=P + S + 2)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def ttft(prompt: list[int]) -> tuple[float, int]:
        r = engine.submit(prompt, params).result()
        _raise_if_failed([r])
        return r.ttft, r.usage["cached_tokens"]

    suffix = lambda: torch.randint(0, V, (S,), generator=gen).tolist()
    ttft(prefix + suffix())  # warm-up
    miss, hit, cached = [], [], 0
    for _ in range(args.repeats):
        engine.prefix_cache.clear()
        miss.append(ttft(prefix + suffix())[0])  # leaves the prefix in the cache
        t, cached = ttft(prefix + suffix())
        hit.append(t)
    m, h = statistics.median(miss), statistics.median(hit)
    result = {"bench": "prefix-cache", "model": args.model, "device": str(model.embed_tokens.weight.device), "prefix_len": P, "suffix_len": S,
              "ttft_miss_ms": round(m * 1e3, 3), "ttft_hit_ms": round(h * 1e3, 3), "speedup": round(m / h, 2),
              "cached_tokens": cached, "threads": torch.get_num_threads()}
    print(json.dumps(result))
    return 0
