"""moonlet.tokenizer: K2's tiktoken format, special-token layout, BPE training, the shipped default."""

import base64
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moonlet.tokenizer import (
    ASSET_DIR,
    K2_PAT_STR,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    read_ranks,
    train_bpe,
)

ROOT = Path(__file__).resolve().parents[1]
# K2's named special tokens at their K2 ids (K2_SPEC.md section 4)
K2_SPECIALS = {
    "[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587, "<|im_assistant|>": 163588,
    "<|im_system|>": 163594, "<|tool_calls_section_begin|>": 163595, "<|tool_calls_section_end|>": 163596,
    "<|tool_call_begin|>": 163597, "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599,
    "<|im_middle|>": 163601, "<think>": 163606, "</think>": 163607, "[PAD]": 163839,
}


def write_ranks(path: Path, tokens: list[bytes]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))


@pytest.fixture(scope="module")
def k2_like_dir(tmp_path_factory) -> Path:
    """A K2-sized ranks file (163584 ranks: 256 bytes, all byte pairs, then byte triples) + K2's config."""
    d = tmp_path_factory.mktemp("k2tok")
    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    i = 0
    while len(tokens) < 163584:
        tokens.append(bytes([i >> 16 & 255, i >> 8 & 255, i & 255]))
        i += 1
    write_ranks(d / "tiktoken.model", tokens)
    decoder = {str(i): {"content": s, "special": True} for s, i in K2_SPECIALS.items()}
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    return d


def test_loader_puts_specials_at_k2_ids_read_from_tokenizer_config(k2_like_dir):
    tok = Tokenizer.from_dir(k2_like_dir)
    assert tok.n_ranks == 163584 and tok.vocab_size == 163840
    for name, i in K2_SPECIALS.items():
        assert tok.special[name] == i
    assert (tok.im_end_id, tok.think_id, tok.think_end_id, tok.bos_id, tok.pad_id) == (163586, 163606, 163607, 163584, 163839)
    assert tok.special["<|reserved_token_163589|>"] == 163589  # unnamed slots get reserved names
    assert len(tok.special) == 256 and tok.is_special(163700) and not tok.is_special(163583)
    assert tok.encode("<|im_end|>", allow_special=True) == [163586]
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"


def test_loader_without_tokenizer_config_uses_k2_layout_after_the_ranks(tmp_path):
    write_ranks(tmp_path / "tiktoken.model", [bytes([b]) for b in range(256)] + [b"ab", b"abc"])
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 258 + 256
    assert tok.special["[BOS]"] == 258 and tok.im_end_id == 260 and tok.think_end_id == 258 + 23
    assert tok.special["[PAD]"] == 258 + 255
    assert tok.encode("abc") == [257]


def test_malformed_ranks_file_names_file_and_line(tmp_path):
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match=r"tiktoken.model:2"):
        read_ranks(tmp_path / "tiktoken.model")
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(TokenizerError, match="without gaps"):
        read_ranks(tmp_path / "tiktoken.model")
    with pytest.raises(FileNotFoundError, match="no tiktoken.model"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_special_id_colliding_with_ranks_is_an_error(tmp_path):
    write_ranks(tmp_path / "tiktoken.model", [bytes([b]) for b in range(256)])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"10": {"content": "[BOS]"}}}))
    with pytest.raises(TokenizerError, match="collides"):
        Tokenizer.from_dir(tmp_path)


def test_shipped_default_has_32768_ids_with_k2_special_order():
    tok = load_tokenizer(None)
    assert tok.n_ranks == 32512 and tok.vocab_size == 32768
    for name, k2_id in K2_SPECIALS.items():
        assert tok.special[name] == 32512 + (k2_id - 163584), name
    assert tok.stop_ids == [32514, 32513]
    size = sum(f.stat().st_size for f in ASSET_DIR.iterdir())
    assert size < 1_000_000
    # trained on English technical prose: common words are single tokens, text compresses well
    assert len(tok.encode(" the")) == 1 and len(tok.encode(" function")) == 1
    text = "The Python interpreter reads the source file and executes each statement in turn."
    assert len(text.encode()) / len(tok.encode(text)) > 3.5


def test_load_tokenizer_falls_back_to_default_and_caches(tmp_path):
    default = load_tokenizer(None)
    assert load_tokenizer(None) is default
    assert load_tokenizer("nano") is default  # a preset name
    assert load_tokenizer(tmp_path) is default  # a checkpoint directory without tokenizer files
    with pytest.raises(FileNotFoundError, match="no such"):
        load_tokenizer(tmp_path / "does-not-exist")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_default_tokenizer_roundtrips_any_unicode(text):
    tok = load_tokenizer(None)
    ids = tok.encode(text)
    assert all(0 <= i < tok.n_ranks for i in ids)
    assert tok.decode(ids) == text


def test_special_token_text_is_ordinary_text_unless_allowed():
    tok = load_tokenizer(None)
    plain = tok.encode("a<|im_end|>b")
    assert tok.im_end_id not in plain and tok.decode(plain) == "a<|im_end|>b"
    assert tok.im_end_id in tok.encode("a<|im_end|>b", allow_special=True)
    assert tok.decode([tok.think_id, tok.think_end_id]) == "<think></think>"


# Code points assigned in Python's Unicode database: engines built on different Unicode versions may
# classify not-yet-assigned ones differently (seen: U+3D000), which is no K2 behaviour we can pin.
_pieces_text = st.text(st.sampled_from(list("abAB éÉ中文1234_'s\n\t.,!?-ÿ"))
                       | st.characters(blacklist_categories=("Cs", "Cn")), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_pieces_text)
def test_tiktoken_splits_text_exactly_like_python_regex_v1_on_k2_pattern(text):
    # Ranks holding every substring of every regex-V1 piece make BPE merge each piece into one token,
    # so the decoded tokens are tiktoken's own split: it must equal the V1 regex split.
    pieces = regex.findall(K2_PAT_STR, text, flags=regex.V1)
    ranks = {bytes([b]): b for b in range(256)}
    for p in pieces:
        b = p.encode()
        for n in range(2, len(b) + 1):
            for s in range(len(b) - n + 1):
                ranks.setdefault(b[s:s + n], len(ranks))
    enc = tiktoken.Encoding("t", pat_str=K2_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    assert [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(text)] == [p.encode() for p in pieces]


CORPUS = ("The quick brown fox jumps over the lazy dog. " * 20 + "def function(argument): return argument\n" * 20
          + "中文文本和English mixed text. Ünïcödé wörds répétés. " * 10)


def test_train_bpe_saves_k2_format_and_reloads_identically(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(CORPUS)
    (tmp_path / "corpus" / "blob.bin").write_bytes(b"\xff\xfe\x00binary")  # skipped: NUL bytes, binary
    tok = train_bpe([tmp_path / "corpus"], vocab_size=256 + 256 + 60)
    assert tok.n_ranks == 316 and tok.vocab_size == 572
    assert tok.special["[BOS]"] == 316 and tok.im_end_id == 318 and tok.special["[PAD]"] == 571
    tok.save(tmp_path / "out")
    lines = (tmp_path / "out" / "tiktoken.model").read_text().splitlines()
    assert len(lines) == 316 and lines[0] == "AA== 0"
    again = Tokenizer.from_dir(tmp_path / "out")
    assert again.special == tok.special and again.ranks == tok.ranks
    sample = "The quick brown fox: def function(argument) 中文 wörds"
    ids = tok.encode(sample)
    assert again.encode(sample) == ids and again.decode(ids) == sample
    assert len(ids) < len(sample.encode()) / 2  # merges learned from the corpus are used


MIXED = " héllo 世界 ✓ 🤖 \n\n\t  x ١٢٣ ÄÖÜ straße 𝔘𝔫𝔦 \r\n  \u00a0 x   def f(a):\n\treturn a  # 12345678"


@functools.cache
def hf_twin(trained: bool):
    """The tokenizer.json that Tokenizer.save writes, loaded by transformers' AutoTokenizer (no remote code)."""
    transformers = pytest.importorskip("transformers")
    d = Path(tempfile.mkdtemp())
    if trained:
        (d / "corpus").mkdir()
        (d / "corpus" / "a.txt").write_text(CORPUS)
        tok = train_bpe([d / "corpus"], vocab_size=256 + 256 + 60)
    else:
        tok = load_tokenizer(None)
    tok.save(d / "tok")
    return tok, transformers.AutoTokenizer.from_pretrained(d / "tok")


@pytest.mark.parametrize("trained", [False, True], ids=["shipped", "trained"])
def test_a_saved_tokenizer_is_an_hf_tokenizer_with_the_same_ids(trained):
    """vLLM, SGLang and transformers read tokenizer.json: moonlet's own sources and README, mixed scripts and
    whitespace give the same ids both ways, the ids decode back, and the specials sit at the same ids. (HF reads
    special-token text as the token unless split_special_tokens; moonlet only with allow_special.)"""
    tok, hf = hf_twin(trained)
    texts = [p.read_text() for p in sorted((ROOT / "moonlet").glob("*.py"))]
    for text in texts + [(ROOT / "README.md").read_text(), MIXED, CORPUS]:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == ids and hf.decode(ids) == text
    turn = "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|><think>"
    assert hf.encode(turn, add_special_tokens=False) == tok.encode(turn, allow_special=True)
    assert len(hf) == tok.vocab_size
    assert [hf.bos_token_id, hf.eos_token_id, hf.pad_token_id] == [tok.special[s] for s in ("[BOS]", "[EOS]", "[PAD]")]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_the_hf_tokenizer_encodes_any_unicode_the_same(text):
    tok, hf = hf_twin(False)
    assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text)


def test_train_reads_cp1252_text_and_refuses_a_corpus_with_no_text(tmp_path):
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / "a.txt").write_bytes(("café naïve résumé déjà vu " * 2000).encode("cp1252"))
    tok = train_bpe([tmp_path / "latin"], vocab_size=1000)
    assert tok.n_ranks > 256 and len(tok.encode("café naïve")) <= 4  # its words were learned, not skipped
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\x00\x01" * 100)
    (tmp_path / "bin" / "empty.txt").write_bytes(b"")
    with pytest.raises(TokenizerError, match="no text to train on: 2 file.*1 of them binary"):
        train_bpe([tmp_path / "bin"], vocab_size=1000)


def test_a_whitespace_run_of_a_million_characters_encodes_and_round_trips():
    tok = load_tokenizer(None)  # tiktoken alone overflows its stack (a Rust panic) on this
    text = "start" + " " * 1_000_000 + "end\n" + "\t" * 70_000
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.encode_batch([text, "x"])[0] == ids
    assert tok.encode("a" + " " * 100 + "b") == tok._enc.encode_ordinary("a" + " " * 100 + "b")  # short: as before


def test_train_rejects_a_vocab_too_small_for_bytes_and_specials(tmp_path):
    (tmp_path / "a.txt").write_text(CORPUS)
    with pytest.raises(TokenizerError, match="--vocab-size 300"):
        train_bpe([tmp_path / "a.txt"], vocab_size=300)
    with pytest.raises(FileNotFoundError, match="--source"):
        train_bpe([tmp_path / "nope"], vocab_size=600)


def test_cli_tokenizer_train_is_one_command(tmp_path):
    (tmp_path / "a.txt").write_text(CORPUS)
    out = tmp_path / "tok"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "moonlet.cli", "tokenizer", "train", "--source", str(tmp_path / "a.txt"),
                        "--vocab-size", "600", "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["vocab_size"] == 600 and summary["ranks"] == 344
    assert load_tokenizer(out).vocab_size == 600


def test_a_mistyped_tokenizer_name_or_a_directory_without_its_files_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="'tok300': no such tokenizer directory, and not a model preset"):
        load_tokenizer("tok300")
    with pytest.raises(TokenizerError, match="no tiktoken.model"):
        load_tokenizer(tmp_path, strict=True)  # an explicit --tokenizer must be a tokenizer


def test_cli_tokenizer_info_reports_an_unknown_tokenizer_in_one_line(tmp_path, capsys):
    from moonlet.tokenizer import cli_tokenizer

    assert cli_tokenizer(["info", "tok300"]) == 2
    assert capsys.readouterr().err.startswith("moonlet tokenizer info: 'tok300': no such tokenizer")
    assert cli_tokenizer(["info", str(tmp_path / "nope")]) == 2
    assert "no such tokenizer or checkpoint directory" in capsys.readouterr().err


def test_cli_tokenizer_train_refuses_a_file_as_out_before_training(tmp_path, capsys):
    from moonlet.tokenizer import cli_tokenizer

    (tmp_path / "a.txt").write_text("some text " * 50)
    assert cli_tokenizer(["train", "--input", str(tmp_path), "--vocab-size", "600", "--out",  # the old name works
                          str(tmp_path / "a.txt")]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err


def test_bench_tokenizer_runs_hf_tokenizers_on_the_saved_tokenizer_json_with_equal_ids(capsys):
    pytest.importorskip("tokenizers")
    from moonlet.tokenizer import cli_bench_tokenizer

    assert cli_bench_tokenizer(["--source", str(ROOT / "moonlet"), "--mb", "0.2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["roundtrip_ok"] and res["ids_equal_hf"] and res["tokens"] > 10_000
