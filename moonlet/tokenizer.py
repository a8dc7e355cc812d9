"""K2's tokenizer format: tiktoken byte-level BPE ranks + 256 special-token slots, and BPE training.

One loader serves the real K2 tokenizer and ours. A tokenizer directory holds
- `tiktoken.model`: one line per BPE token, `base64(token_bytes) rank`, ranks 0..n-1;
- `tokenizer_config.json` (optional): `added_tokens_decoder` {id: {"content": name}} for the specials.
The 256 ids after the ranks are special-token slots laid out as K2's: slot k is K2 id 163584 + k, so
`[BOS]` = n, `[EOS]` = n+1, `<|im_end|>` = n+2, ..., `[PAD]` = n+255. Slots without a name are
`<|reserved_token_{id}|>`. Text is split with K2's pre-tokenizer regex before BPE; it uses character
class intersection (`&&`), which tiktoken's Rust regex and HF tokenizers' Oniguruma both read the same
way (Python's `regex` needs V1 mode; stdlib `re` cannot).

The default tokenizer shipped in moonlet/assets/tokenizer (32768 ids = 32512 ranks + 256 specials, what
the small presets use) was produced with one command:

    moonlet tokenizer train --source /usr/share/doc/python3.11/html/_sources --vocab-size 32768 \\
        --out moonlet/assets/tokenizer

on the Python 3.11 documentation reST sources (Debian package python3.11-doc, PSF licence, ~12 MB of
English technical prose and code): HF `tokenizers` byte-level BPE trained with K2's split regex, then
converted to tiktoken ranks (the 256 single bytes first, in byte order, then merges in training order),
so every byte string, hence every unicode string, round-trips.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import tiktoken

# K2's pre-tokenizer split regex (`pat_str` in Kimi-K2's tokenization_kimi.py): o200k-style with Han runs
# split off and Han removed from the letter classes.
K2_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

K2_SPECIAL_BASE = 163584  # K2's first special id (= its number of BPE ranks)
NUM_SPECIAL_SLOTS = 256
# The named K2 special tokens, by offset from the first special slot (K2 id - 163584).
K2_SPECIAL_NAMES: dict[int, str] = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
    22: "<think>", 23: "</think>", 255: "[PAD]",
}
ASSET_DIR = Path(__file__).parent / "assets" / "tokenizer"
# K2's chat format as a Jinja chat template, for transformers' apply_chat_template and vLLM / SGLang's chat
# endpoints (moonlet itself renders with moonlet.chat; a test keeps the two equal)
CHAT_TEMPLATE = Path(__file__).parent / "assets" / "chat_template.jinja"


def reserved_name(token_id: int) -> str:
    return f"<|reserved_token_{token_id}|>"


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """tiktoken-backed BPE with K2's special tokens.

    `encode(text)` treats special-token *text* as ordinary text (safe for user data); pass
    `allow_special=True` to turn e.g. "<|im_end|>" in the text into its special id. `special` maps
    every special name to its id; `im_end_id`, `think_id`, `think_end_id`... are shortcuts.
    """

    def __init__(self, ranks: dict[bytes, int], special: dict[str, int], pat_str: str = K2_PAT_STR,
                 name: str = "moonlet"):
        self.ranks = ranks
        self.n_ranks = len(ranks)
        self.special = dict(special)
        self.pat_str = pat_str
        self.name = name
        self.special_ids = frozenset(self.special.values())
        self.id_to_special = {i: s for s, i in self.special.items()}
        self.vocab_size = max([self.n_ranks - 1, *self.special_ids]) + 1
        self._enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=self.special)

    # --- loading and saving -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        model = path / "tiktoken.model"
        if not model.is_file():
            raise FileNotFoundError(f"{model}: no tiktoken.model in tokenizer directory {path}")
        ranks = read_ranks(model)
        names: dict[int, str] = {}
        config = path / "tokenizer_config.json"
        if config.is_file():
            try:
                decoder = json.loads(config.read_text()).get("added_tokens_decoder", {})
                names = {int(i): entry["content"] for i, entry in decoder.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise TokenizerError(f"{config}: bad added_tokens_decoder ({e})") from e
            bad = [i for i in names if i < len(ranks)]
            if bad:
                raise TokenizerError(f"{config}: special token id {bad[0]} collides with BPE rank ids "
                                     f"(tiktoken.model has {len(ranks)} ranks)")
        n = len(ranks)
        if not names:  # no table: K2's layout right after the ranks
            names = {n + k: s for k, s in K2_SPECIAL_NAMES.items()}
        slots = {i: reserved_name(i) for i in range(n, n + NUM_SPECIAL_SLOTS)}
        slots.update(names)
        special = {s: i for i, s in sorted(slots.items())}
        if len(special) != len(slots):
            raise TokenizerError(f"{config}: duplicate special token names")
        return cls(ranks, special, name=path.name or "tokenizer")

    def save(self, path: str | os.PathLike) -> None:
        """Write tiktoken.model and tokenizer_config.json (named specials only, K2's chat template), and the
        same BPE as an HF tokenizer.json (see hf_json), atomically per file."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(b).decode()} {r}\n" for b, r in sorted(self.ranks.items(), key=lambda x: x[1])]
        atomic_write(path / "tiktoken.model", "".join(lines))
        named = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
                 for s, i in sorted(self.special.items(), key=lambda x: x[1]) if s != reserved_name(i)}
        config = {"added_tokens_decoder": named, "bos_token": "[BOS]", "eos_token": "[EOS]",
                  "pad_token": "[PAD]", "model_max_length": 1048576, "tokenizer_class": "PreTrainedTokenizerFast",
                  "chat_template": CHAT_TEMPLATE.read_text()}
        atomic_write(path / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic_write(path / "tokenizer.json", json.dumps(self.hf_json(), ensure_ascii=False) + "\n")

    def hf_json(self) -> dict:
        """This BPE in HF `tokenizers`' tokenizer.json format, so that transformers' AutoTokenizer, vLLM and SGLang
        load a moonlet checkpoint's tokenizer without K2's remote code. tiktoken merges, at each step, the adjacent
        pair whose concatenation has the lowest rank; an HF BPE whose merges are every split (a, b) of every token,
        ordered by the token's rank, does the same (ignore_merges: a whole piece that is a token stays one, as
        in tiktoken). Vocab strings use the byte-level alphabet of HF's ByteLevel pre-tokenizer."""
        char = _bytes_to_unicode()
        text = lambda b: "".join(char[x] for x in b)  # noqa: E731
        merges = [f"{text(t[:i])} {text(t[i:])}" for t, _ in sorted(self.ranks.items(), key=lambda x: x[1])
                  for i in range(1, len(t)) if t[:i] in self.ranks and t[i:] in self.ranks]
        added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                  "special": True} for s, i in sorted(self.special.items(), key=lambda x: x[1])]
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": self.pat_str}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
                "post_processor": None,
                "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                          "vocab": {text(t): r for t, r in self.ranks.items()}, "merges": merges}}

    # --- encode / decode ----------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if len(text) > MAX_SPACE_RUN and LONG_SPACE.search(text):
            return [i for part in _cut_space_runs(text) for i in self.encode(part, allow_special)]
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        if any(len(t) > MAX_SPACE_RUN for t in texts):
            return [self.encode(t, allow_special) for t in texts]
        if allow_special:
            return self._enc.encode_batch(texts, allowed_special="all")
        return self._enc.encode_ordinary_batch(texts)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(list(ids))

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        return self._enc.decode_bytes(list(ids)).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a special token's name, encoded)."""
        return self._enc.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    # --- the specials the chat format and the engine need -----------------------------------------
    def _sp(self, name: str) -> int:
        if name not in self.special:
            raise TokenizerError(f"tokenizer {self.name!r} has no special token {name}")
        return self.special[name]

    bos_id = property(lambda self: self._sp("[BOS]"))
    eos_id = property(lambda self: self._sp("[EOS]"))
    pad_id = property(lambda self: self._sp("[PAD]"))
    im_end_id = property(lambda self: self._sp("<|im_end|>"))
    think_id = property(lambda self: self._sp("<think>"))
    think_end_id = property(lambda self: self._sp("</think>"))

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated assistant message (K2 stops at <|im_end|>; [EOS] as a safety net)."""
        return [self.im_end_id, self.eos_id]

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, ranks={self.n_ranks}, vocab_size={self.vocab_size})"


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise TokenizerError(f"{path}:{lineno}: expected 'base64(token) rank' ({e})") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps or duplicates")
    return ranks


def atomic_write(path: Path, text: str) -> None:
    """Write a text file so that a crash leaves the old file or the new one, never half of one (tmp + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@functools.lru_cache(maxsize=8)
def _load_dir_cached(path: str) -> Tokenizer:
    return Tokenizer.from_dir(path)


def load_tokenizer(path: str | os.PathLike | None = None, strict: bool = False) -> Tokenizer:
    """The tokenizer of a checkpoint directory (one holding tiktoken.model), else moonlet's default.

    None, a model preset name, or (unless `strict`) a checkpoint directory without tokenizer files give the
    shipped default (cached), so every command works without a download. Anything else is an error: a path
    that does not exist, a name that is no preset (a mistyped directory), and with `strict` (an explicit
    --tokenizer) a directory without tiktoken.model.
    """
    from moonlet.config import PRESETS

    if path is None or str(path) in PRESETS:
        return _load_dir_cached(str(ASSET_DIR))
    p = Path(path)
    if p.is_file() and p.name == "tiktoken.model":
        p = p.parent
    if p.is_dir():
        if (p / "tiktoken.model").is_file():
            return _load_dir_cached(str(p.resolve()))
        if strict:
            raise TokenizerError(f"{path}: not a tokenizer directory (no tiktoken.model); make one with "
                                 "`moonlet tokenizer train`")
        return load_tokenizer(None)
    if os.sep not in str(path) and "/" not in str(path):
        raise TokenizerError(f"{path!r}: no such tokenizer directory, and not a model preset "
                             f"({', '.join(PRESETS)}); omit it for moonlet's default tokenizer")
    raise FileNotFoundError(f"{path}: no such tokenizer or checkpoint directory")


# --- training ---------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char map, which HF's ByteLevel pre-tokenizer uses for its vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _text_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--source {item}: no such file or directory")
    if not files:
        raise FileNotFoundError(f"--source {list(map(str, inputs))}: no files found")
    return files


def decode_text(data: bytes) -> str:
    """A text document's bytes: UTF-8, else Windows-1252 (what older "latin" documents mostly are), else Latin-1,
    which always decodes. Replacing undecodable bytes would lose every accented word of such a file (the corpus
    readers and the search index use this)."""
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


# tiktoken's regex engine overflows its stack on a whitespace run of ~1M characters (a Rust panic, which is a
# BaseException): longer runs are encoded in pieces; the ids still decode to the text.
MAX_SPACE_RUN = 1 << 16
LONG_SPACE = re.compile(rf"\s{{{MAX_SPACE_RUN + 1},}}")


def _cut_space_runs(text: str) -> Iterable[str]:
    """text in pieces where no piece holds a whitespace run over MAX_SPACE_RUN; each run's last character
    stays with the text after it, as the split pattern would keep it (" word")."""
    start = 0
    for m in LONG_SPACE.finditer(text):
        yield text[start: m.start()]
        for a in range(m.start(), m.end() - 1, MAX_SPACE_RUN):
            yield text[a: min(a + MAX_SPACE_RUN, m.end() - 1)]
        start = m.end() - 1
    yield text[start:]


def _iter_texts(files: list[Path], read: dict | None = None) -> Iterable[str]:
    """Each file's text as the corpus readers decode it (UTF-8, else cp1252 / Latin-1); files holding NUL
    bytes are binary and skipped. `read` counts {"files", "skipped"} for the caller's report."""
    read = read if read is not None else {}
    for f in files:
        data = f.read_bytes()
        if not data:
            continue
        kind = "skipped" if b"\0" in data else "files"
        read[kind] = read.get(kind, 0) + 1
        if kind == "files":
            yield decode_text(data)


def train_bpe(inputs: Iterable[str | os.PathLike], vocab_size: int, pat_str: str = K2_PAT_STR,
              show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE on text files with HF `tokenizers`; return it in K2's format.

    vocab_size counts every id: vocab_size - 256 BPE ranks (the 256 single bytes included) followed by
    the 256 special slots in K2's layout.
    """
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    n_ranks = vocab_size - NUM_SPECIAL_SLOTS
    if n_ranks < 256:
        raise TokenizerError(f"--vocab-size {vocab_size}: must be at least {256 + NUM_SPECIAL_SLOTS} "
                             f"(256 byte tokens + {NUM_SPECIAL_SLOTS} special slots)")
    files = _text_files(inputs)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_ranks, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    read: dict = {}
    hf.train_from_iterator(_iter_texts(files, read), trainer=trainer)
    if not read.get("files"):
        raise TokenizerError(f"no text to train on: {len(files)} file(s), {read.get('skipped', 0)} of them binary "
                             "(NUL bytes), the rest empty")
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for tok, _ in sorted(hf.get_vocab().items(), key=lambda x: x[1]):
        tb = bytes(byte_of[c] for c in tok)
        if tb not in ranks:
            ranks[tb] = len(ranks)
    n = len(ranks)
    special = {reserved_name(i): i for i in range(n, n + NUM_SPECIAL_SLOTS)}
    for k, s in K2_SPECIAL_NAMES.items():
        del special[reserved_name(n + k)]
        special[s] = n + k
    return Tokenizer(ranks, special, pat_str=pat_str)


def cli_tokenizer(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="moonlet tokenizer", description=(
        "Train a byte-level BPE tokenizer in K2's format (tiktoken.model + tokenizer_config.json), or "
        "inspect one. The shipped default was made with: moonlet tokenizer train --source "
        "/usr/share/doc/python3.11/html/_sources --vocab-size 32768 --out moonlet/assets/tokenizer"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a BPE on text files and save it in K2's format")
    tr.add_argument("--source", "--input", dest="input", metavar="PATH", nargs="+", required=True,
                    help="text files and/or directories, read recursively (--input is the old name)")
    tr.add_argument("--vocab-size", type=int, default=32768,
                    help="total ids: BPE ranks + 256 K2 special slots (default 32768 = 32512 + 256)")
    tr.add_argument("--out", required=True, help="output directory")
    tr.add_argument("--json", action="store_true", help="print one JSON summary line last")
    info = sub.add_parser("info", help="summarize a tokenizer directory (default: the shipped one)")
    info.add_argument("path", nargs="?", default=None)
    info.add_argument("--text", default="Hello, Kimi! 你好", help="a string to show encoded")
    info.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args(argv)
    if args.cmd == "train":
        if Path(args.out).exists() and not Path(args.out).is_dir():  # before minutes of training, not after
            print(f"moonlet tokenizer train: --out {args.out} is a file; give a directory", file=sys.stderr)
            return 2
        t0 = time.time()
        try:
            tok = train_bpe(args.input, args.vocab_size, show_progress=not args.json)
        except (FileNotFoundError, TokenizerError) as e:
            print(f"moonlet tokenizer train: {e}", file=sys.stderr)
            return 2
        tok.save(args.out)
        summary = {"out": str(args.out), "ranks": tok.n_ranks, "vocab_size": tok.vocab_size,
                   "seconds": round(time.time() - t0, 2)}
        if tok.vocab_size != args.vocab_size:
            print(f"warning: corpus too small for --vocab-size {args.vocab_size}; got {tok.vocab_size}",
                  file=sys.stderr)
        print(json.dumps(summary) if args.json else f"saved {tok!r} to {args.out} in {summary['seconds']} s")
        return 0
    try:
        tok = load_tokenizer(args.path, strict=True)
    except (FileNotFoundError, TokenizerError) as e:
        print(f"moonlet tokenizer info: {e}", file=sys.stderr)
        return 2
    ids = tok.encode(args.text)
    out = {"name": tok.name, "ranks": tok.n_ranks, "vocab_size": tok.vocab_size,
           "im_end_id": tok.im_end_id, "text": args.text, "ids": ids,
           "pieces": [tok.token_bytes(i).decode("utf-8", "replace") for i in ids]}
    print(json.dumps(out, ensure_ascii=False) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def cli_bench_tokenizer(argv: list[str]) -> int:
    """Encode/decode MB/s of moonlet's tokenizer (tiktoken core, K2 regex) next to HF `tokenizers` running
    the same vocabulary (the tokenizer.json moonlet saves), with an id-parity check."""
    ap = argparse.ArgumentParser(prog="moonlet bench tokenizer", description=cli_bench_tokenizer.__doc__)
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the shipped one)")
    ap.add_argument("--source", "--input", dest="input", metavar="PATH",
                    default="/usr/share/doc/python3.11/html/_sources", help="text file or directory to encode "
                    "(default: the Python docs, else moonlet's source; --input is the old name)")
    ap.add_argument("--mb", type=float, default=4.0, help="megabytes of text to use")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args(argv)
    src = Path(args.input) if Path(args.input).exists() else Path(__file__).parent
    budget, texts, size = int(args.mb * 1e6), [], 0
    for t in _iter_texts(_text_files([src])):
        texts.append(t)
        size += len(t.encode())
        if size >= budget:
            break
    text = "".join(texts)
    nbytes = len(text.encode())
    tok = load_tokenizer(args.tokenizer)

    def timed(fn, *a):
        best, out = float("inf"), None
        for _ in range(3):
            t0 = time.perf_counter()
            out = fn(*a)
            best = min(best, time.perf_counter() - t0)
        return out, best

    ids, t_enc = timed(tok.encode, text)
    _, t_dec = timed(tok.decode, ids)
    res = {"bench": "tokenizer", "tokenizer": args.tokenizer or "moonlet default", "vocab_size": tok.vocab_size,
           "text_mb": round(nbytes / 1e6, 3),
           "tokens": len(ids), "bytes_per_token": round(nbytes / len(ids), 3),
           "moonlet_encode_mb_s": round(nbytes / t_enc / 1e6, 2), "moonlet_decode_mb_s": round(nbytes / t_dec / 1e6, 2),
           "roundtrip_ok": tok.decode(ids) == text}
    try:
        hf = _hf_peer(tok)
    except ImportError as e:
        res["hf_tokenizers"] = f"unavailable ({e})"
    else:
        enc, t_hf_enc = timed(lambda s: hf.encode(s, add_special_tokens=False), text)
        _, t_hf_dec = timed(lambda x: hf.decode(x, skip_special_tokens=False), enc.ids)
        res.update({"hf_encode_mb_s": round(nbytes / t_hf_enc / 1e6, 2), "hf_decode_mb_s": round(nbytes / t_hf_dec / 1e6, 2),
                    "encode_speedup_vs_hf": round(t_hf_enc / t_enc, 2), "decode_speedup_vs_hf": round(t_hf_dec / t_dec, 2),
                    "ids_equal_hf": enc.ids == ids})
    if not args.json:
        for k, v in res.items():
            print(f"{k:>24}: {v}")
    print(json.dumps(res))
    return 0


def _hf_peer(tok: Tokenizer):
    """The same BPE run by HF `tokenizers` (its Rust engine), from the tokenizer.json that save() writes, reading
    special-token text as text (as moonlet's encode does without allow_special)."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(json.dumps(tok.hf_json()))
    hf.encode_special_tokens = True
    return hf
