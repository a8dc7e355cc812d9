"""Training data: memory-mapped token shards, packing to fixed length, SFT conversations with the loss mask,
and `moonlet data prepare` (one cached command).

A data directory holds `meta.json` and, per split ("train", "val"), shards `{split}_{k:03d}.bin` of raw
token ids (uint16 when the vocabulary fits, else uint32) with optional `{split}_{k:03d}.mask.bin` (uint8,
1 = train on this token; SFT only). Documents are concatenated (each followed by [EOS]); conversations are
rendered in K2's format by `moonlet.chat.render_ids`, whose mask covers assistant output only.

Packing: the split's token stream is cut into windows of seq_len + 1 tokens (inputs and shifted targets),
read in a seeded random order that is reshuffled every epoch. Window g of the run is a pure function of
(seed, g), so the data position of a run is one integer: resume and any data-parallel world size read
exactly the same sequences.

The real corpus is the Python documentation's reST sources from Debian's `python3.11-doc`
(/usr/share/doc/python3.11/html/_sources, ~12 MB of English technical prose and code, PSF licence):
`apt-get install python3.11-doc`, then `moonlet data prepare`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from moonlet.tokenizer import decode_text

PYTHON_DOCS = "/usr/share/doc/python3.11/html/_sources"
FORMAT = 1
SHARD_TOKENS = 1 << 27  # 128M tokens (256 MB of uint16) per shard


class DataError(ValueError):
    """A data file or directory is missing or malformed."""


# ------------------------------------------------------------------------------------------------------
# writing shards


class ShardWriter:
    """Append token ids (and optionally a loss mask) to the shards of one split."""

    def __init__(self, directory: Path, split: str, vocab_size: int, with_mask: bool):
        self.dir, self.split, self.with_mask = directory, split, with_mask
        self.dtype = np.uint16 if vocab_size <= 65536 else np.uint32
        self.files: list[dict] = []
        self._ids: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        self._n = 0

    def add(self, ids: list[int], mask: list[int] | None = None) -> None:
        if self.with_mask and (mask is None or len(mask) != len(ids)):
            raise DataError("SFT data needs a loss mask with one entry per token")
        self._ids.append(np.asarray(ids, dtype=self.dtype))
        if self.with_mask:
            self._mask.append(np.asarray(mask, dtype=np.uint8))
        self._n += len(ids)
        if self._n >= SHARD_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self._n:
            return
        name = f"{self.split}_{len(self.files):03d}"
        np.concatenate(self._ids).tofile(self.dir / f"{name}.bin")
        if self.with_mask:
            np.concatenate(self._mask).tofile(self.dir / f"{name}.mask.bin")
        self.files.append({"name": name, "tokens": self._n})
        self._ids, self._mask, self._n = [], [], 0

    def close(self) -> dict:
        self.flush()
        return {"shards": self.files, "tokens": sum(f["tokens"] for f in self.files)}


def write_dataset(out: Path, splits: dict[str, Iterable[tuple[list[int], list[int] | None]]], vocab_size: int,
                  with_mask: bool, info: dict) -> dict:
    """Write every split into a temporary directory and rename it into place, so a crash never leaves a
    data directory that looks complete."""
    check_out(out)
    # a hidden name of our own: `<out>.tmp` may be the user's, and two runs must not share one
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"format": FORMAT, "vocab_size": vocab_size, "dtype": "uint16" if vocab_size <= 65536 else "uint32",
            "mask": with_mask, "splits": {}, **info}
    try:
        for split, items in splits.items():
            w = ShardWriter(tmp, split, vocab_size, with_mask)
            for ids, mask in items:
                w.add(ids, mask)
            meta["splits"][split] = w.close()
        if not meta["splits"]["train"]["tokens"]:
            raise DataError(f"{info.get('source', out)}: no training tokens (an empty source, or every document "
                            "went to the val split)")
    except BaseException:  # a bad record, Ctrl-C: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():  # renamed aside first, so there is never a moment with neither directory in place
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def read_meta(directory: Path) -> dict | None:
    """The meta.json of a moonlet data directory, or None when there is none (or it is not ours)."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and "format" in meta and isinstance(meta.get("splits"), dict) else None


def check_out(out: Path, source: Path | None = None) -> None:
    """--out gets replaced, so it must be empty or a moonlet data directory, and apart from the source:
    `--out myproject` must never delete myproject/thesis.tex."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file, not a data directory")
    if source is not None:
        o, s = out.resolve(), source.resolve()
        if o == s or o in s.parents or s in o.parents:
            raise DataError(f"--out {out} overlaps --source {source}; write the data to a directory of its own")
    if out.is_dir() and any(out.iterdir()) and read_meta(out) is None:
        raise DataError(f"--out {out} holds other files and no moonlet meta.json; it would be replaced, so "
                        "choose an empty or new directory")


# ------------------------------------------------------------------------------------------------------
# reading: memory-mapped shards and packed windows


class TokenShards:
    """One split's shards as a single virtual token (and mask) array, memory-mapped."""

    def __init__(self, directory: str | Path, split: str = "train"):
        self.dir = Path(directory)
        meta_file = self.dir / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{self.dir}: no meta.json; build the data with `moonlet data prepare --out {self.dir}`")
        self.meta = json.loads(meta_file.read_text())
        if split not in self.meta["splits"]:
            raise DataError(f"{meta_file}: no split {split!r} (has {', '.join(self.meta['splits'])})")
        dtype = np.dtype(self.meta["dtype"])
        self.tokens, self.masks, starts = [], [], [0]
        for shard in self.meta["splits"][split]["shards"]:
            path = self.dir / f"{shard['name']}.bin"
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"{path}: missing or truncated (meta.json says {shard['tokens']} tokens)")
            self.tokens.append(np.memmap(path, dtype=dtype, mode="r"))
            if self.meta["mask"]:
                self.masks.append(np.memmap(self.dir / f"{shard['name']}.mask.bin", dtype=np.uint8, mode="r"))
            starts.append(starts[-1] + shard["tokens"])
        self.starts = starts
        self.n_tokens = starts[-1]

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens [start, start + length) across shard boundaries (+ the mask slice for SFT data)."""
        ids, masks = [], []
        end = start + length
        for k in range(len(self.tokens)):
            lo, hi = max(start, self.starts[k]), min(end, self.starts[k + 1])
            if lo < hi:
                ids.append(self.tokens[k][lo - self.starts[k] : hi - self.starts[k]])
                if self.masks:
                    masks.append(self.masks[k][lo - self.starts[k] : hi - self.starts[k]])
        return np.concatenate(ids), (np.concatenate(masks) if masks else None)


class PackedData:
    """Fixed-length training windows in a seeded, per-epoch shuffled order. `batch(first, n)` returns the n
    windows starting at run-global index `first`: input ids [n, T], targets [n, T], loss mask [n, T]."""

    def __init__(self, directory: str | Path, seq_len: int, split: str = "train", seed: int = 0,
                 shuffle: bool = True):
        self.shards = TokenShards(directory, split)
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.n_windows = (self.shards.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"{directory}: split {split!r} has {self.shards.n_tokens} tokens, fewer than one "
                            f"window of seq_len + 1 = {seq_len + 1}")
        self._perm: tuple[int, torch.Tensor] | None = None

    def window_index(self, g: int) -> int:
        epoch, i = divmod(g, self.n_windows)
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n_windows, generator=gen))
        return int(self._perm[1][i])

    def batch(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows, masks = [], []
        for g in range(first, first + n):
            ids, mask = self.shards.read(self.window_index(g) * T, T + 1)
            rows.append(torch.from_numpy(ids.astype(np.int64)))
            masks.append(torch.ones(T, dtype=torch.bool) if mask is None else torch.from_numpy(mask[1:] > 0))
        x = torch.stack(rows)
        return x[:, :-1], x[:, 1:], torch.stack(masks)


# ------------------------------------------------------------------------------------------------------
# sources: plain text files and SFT conversations


def text_files(source: str | Path) -> list[Path]:
    """Every text file under a directory (sorted), or the one file given."""
    p = Path(source)
    if p.is_file() and p.suffix == ".jsonl":  # its JSON syntax would be trained on as if it were prose
        raise DataError(f"{p} is a JSONL file: for SFT conversations give --kind sft; a text corpus is a "
                        "directory of .txt/.rst/.md files or one text file")
    if p.is_file():
        return [p]
    if not p.is_dir():
        hint = " (install it with `apt-get install python3.11-doc`)" if str(p) == PYTHON_DOCS else ""
        raise DataError(f"{p}: no such file or directory{hint}")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".rst", ".md"))
    if not files:
        raise DataError(f"{p}: no .txt/.rst/.md files found")
    return files


def text_documents(files: list[Path], tokenizer) -> Iterator[tuple[list[int], None]]:
    for f in files:
        text = decode_text(f.read_bytes())
        if text.strip():
            yield tokenizer.encode(text) + [tokenizer.eos_id], None


def read_conversations(path: str | Path) -> Iterator[tuple[dict, str]]:
    """JSONL lines {"messages": [...], "tools": [...]?}; errors name the file and line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:  # utf-8-sig on the first line: editors on Windows start files with a byte-order mark
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 ({e})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise DataError(f"{where}: not valid JSON ({str(e)[:200]})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
                raise DataError(f"{where}: expected an object with a non-empty 'messages' list")
            yield rec, where


def sft_examples(path: str | Path, tokenizer, train_on: str = "live") -> Iterator[tuple[list[int], list[int]]]:
    """Render each conversation in K2's format: (ids, assistant-only loss mask)."""
    from moonlet.chat import render_ids

    for rec, where in read_conversations(path):
        roles = {m.get("role") for m in rec["messages"] if isinstance(m, dict)} - {"system", "user", "assistant", "tool"}
        if roles:  # K2's template renders any other role as a system message, never trained on: a typo hides
            raise DataError(f"{where}: unknown role(s) {sorted(map(str, roles))}; use system, user, assistant, tool")
        try:
            ids, mask = render_ids(rec["messages"], tokenizer, tools=rec.get("tools"), train_on=train_on)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where}: cannot render conversation ({e})") from e
        if not any(mask):
            raise DataError(f"{where}: no assistant message to train on")
        yield ids, mask


def _fingerprint(files: list[Path], tokenizer, extra: str) -> str:
    """Sources by path, size and mtime; the tokenizer by content (every rank, special token and the split
    pattern): two tokenizers of one vocabulary size give different ids for the same text."""
    h = hashlib.sha256(f"{FORMAT}|{extra}|{tokenizer.pat_str}|{sorted(tokenizer.special.items())}".encode())
    h.update(b"".join(b"%d %d " % (rank, len(token)) + token for token, rank in tokenizer.ranks.items()))
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepare(source: str | Path = PYTHON_DOCS, out: str | Path = "data/python-docs", kind: str = "text",
            val_every: int = 50, tokenizer_path: str | None = None, force: bool = False) -> dict:
    """Tokenize a text corpus (kind="text": every file a document; every val_every-th file goes to "val")
    or SFT conversations (kind="sft": a JSONL file; every val_every-th conversation to "val"). Cached: a
    directory whose meta.json fingerprint matches the sources and tokenizer is reused as is."""
    from moonlet.tokenizer import ASSET_DIR, TokenizerError, atomic_write, load_tokenizer

    if kind not in ("text", "sft"):
        raise DataError(f"--kind {kind!r}: choose 'text' or 'sft'")
    if val_every == 1:
        raise DataError("--val-every 1 puts every document in the val split, leaving nothing to train on; use 0 "
                        "(no val split) or N >= 2")
    try:
        tok = load_tokenizer(tokenizer_path, strict=True)
    except (FileNotFoundError, TokenizerError) as e:
        raise DataError(f"--tokenizer {e}") from e
    # recorded so that `moonlet train` saves this tokenizer with its checkpoints (generate then finds it)
    tok_dir = None
    if tokenizer_path is not None and Path(tokenizer_path).exists():
        given = Path(tokenizer_path).resolve()
        given = given.parent if given.is_file() else given
        tok_dir = None if given == ASSET_DIR.resolve() else str(given)
    out = Path(out)
    files = text_files(source) if kind == "text" else [Path(source)]
    if kind == "sft" and not files[0].is_file():
        raise DataError(f"{source}: no such JSONL file")
    check_out(out, Path(source))
    fp = _fingerprint(files, tok, f"{kind}|{val_every}")
    meta_file = out / "meta.json"
    meta = None if force else read_meta(out)
    if meta is not None:
        if meta.get("fingerprint") == fp:
            if meta.get("tokenizer_dir") != tok_dir:  # made before moonlet recorded it, or the same tokenizer moved
                meta["tokenizer_dir"] = tok_dir
                atomic_write(meta_file, json.dumps(meta, indent=2) + "\n")
            return {**meta, "cached": True}
    if kind == "text":
        train_files = [f for i, f in enumerate(files) if val_every <= 0 or i % val_every != val_every - 1]
        val_files = [f for f in files if f not in set(train_files)]
        splits = {"train": text_documents(train_files, tok), "val": text_documents(val_files, tok)}
    else:
        examples = list(sft_examples(files[0], tok))
        splits = {"train": [e for i, e in enumerate(examples) if val_every <= 0 or i % val_every != val_every - 1],
                  "val": [e for i, e in enumerate(examples) if val_every > 0 and i % val_every == val_every - 1]}
    info = {"source": str(source), "kind": kind, "files": len(files), "tokenizer": tok.name, "tokenizer_dir": tok_dir,
            "fingerprint": fp}
    meta = write_dataset(out, splits, tok.vocab_size, kind == "sft", info)
    return {**meta, "cached": False}


def cli_data(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="moonlet data", description="Build tokenized training data (cached).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize a text corpus or SFT JSONL into memory-mapped shards",
                       description="Tokenize a text corpus (default: the Python documentation reST sources of "
                       f"Debian's python3.11-doc, {PYTHON_DOCS}) or a JSONL file of conversations "
                       "({'messages': [...], 'tools': [...]} per line, rendered in K2's format with the "
                       "assistant-only loss mask) into uint16/uint32 shards. Reruns are free when nothing changed.")
    p.add_argument("--source", default=PYTHON_DOCS, help="directory of .txt/.rst/.md files, a text file, or a "
                   "JSONL file with --kind sft (default: %(default)s)")
    p.add_argument("--kind", choices=["text", "sft"], default="text", help="plain text documents or SFT conversations")
    p.add_argument("--out", default="data/python-docs", help="output directory (default: %(default)s)")
    p.add_argument("--val-every", type=int, default=50, help="every N-th document goes to the val split; 0: none")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: moonlet's 32768-id BPE)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = ap.parse_args(argv)
    try:
        meta = prepare(args.source, args.out, args.kind, args.val_every, args.tokenizer, args.force)
    except DataError as e:
        print(f"moonlet data: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moonlet data: interrupted (nothing written)", file=sys.stderr)
        return 130
    summary = {"out": str(args.out), "cached": meta["cached"], "kind": meta["kind"], "files": meta["files"],
               **{f"{s}_tokens": v["tokens"] for s, v in meta["splits"].items()}}
    print(json.dumps(summary) if args.json else "  ".join(f"{k}={v}" for k, v in summary.items()))
    return 0
