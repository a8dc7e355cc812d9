"""Token shards, packing and SFT data (moonlet.data). Tests write their own small corpora."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moonlet import data
from moonlet.chat import render_ids
from moonlet.tokenizer import load_tokenizer

TEXTS = {"a.txt": "The quick brown fox jumps over the lazy dog. " * 20,
         "sub/b.rst": "Python's ``itertools`` module provides fast iterator building blocks.\n" * 15,
         "c.md": "# Heading\n\nSome *markdown* text with code: `print(42)`.\n" * 10,
         "skip.bin": "not a text file"}


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    for name, text in TEXTS.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return src


def test_prepare_tokenizes_every_document_followed_by_eos_into_memory_mapped_shards(corpus, tmp_path):
    tok = load_tokenizer(None)
    meta = data.prepare(corpus, tmp_path / "out", val_every=0)
    assert not meta["cached"] and meta["files"] == 3 and meta["dtype"] == "uint16"
    shards = data.TokenShards(tmp_path / "out", "train")
    ids, mask = shards.read(0, shards.n_tokens)
    assert mask is None
    docs = [TEXTS["a.txt"], TEXTS["c.md"], TEXTS["sub/b.rst"]]  # sorted paths
    expected = sum((tok.encode(t) + [tok.eos_id] for t in docs), [])
    assert ids.tolist() == expected
    assert tok.decode(ids[: len(tok.encode(docs[0]))]) == docs[0]


def hidden(directory):
    """What a write left beside its output: the aside directories are hidden, named after --out."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_prepare_is_cached_until_a_source_changes(corpus, tmp_path):
    out = tmp_path / "out"
    first = data.prepare(corpus, out, val_every=2)
    assert first["splits"]["val"]["tokens"] > 0  # every 2nd document held out
    assert data.prepare(corpus, out, val_every=2)["cached"]
    (corpus / "a.txt").write_text("changed text, longer than before " * 30)
    again = data.prepare(corpus, out, val_every=2)
    assert not again["cached"] and again["fingerprint"] != first["fingerprint"]
    assert hidden(tmp_path) == []  # written aside, then renamed into place


def test_reads_span_shard_boundaries(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHARD_TOKENS", 50)
    data.prepare(corpus, tmp_path / "out", val_every=0)
    shards = data.TokenShards(tmp_path / "out")
    assert len(shards.tokens) > 2
    whole = np.concatenate([np.asarray(t) for t in shards.tokens])
    for start in (0, 45, 49, 50, 97):
        assert shards.read(start, 13)[0].tolist() == whole[start : start + 13].tolist()


def test_missing_data_directory_and_truncated_shard_name_the_file(tmp_path, corpus):
    with pytest.raises(data.DataError, match="moonlet data prepare"):
        data.TokenShards(tmp_path / "nowhere")
    data.prepare(corpus, tmp_path / "out", val_every=0)
    shard = tmp_path / "out" / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(data.DataError, match="train_000.bin"):
        data.TokenShards(tmp_path / "out")


def _packed(tmp_path, n_tokens, seq_len, seed=0):
    ids = list(range(n_tokens))
    data.write_dataset(tmp_path / "p", {"train": [(ids, None)]}, 65536, False, {})
    return data.PackedData(tmp_path / "p", seq_len, seed=seed)


def test_packing_gives_fixed_length_windows_with_shifted_targets(tmp_path):
    pd = _packed(tmp_path, 1000, 16)
    x, y, m = pd.batch(0, 4)
    assert x.shape == y.shape == m.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1]) and bool(m.all())
    assert all(int(r[0]) % 16 == 0 for r in x)  # windows start on seq_len boundaries


@settings(max_examples=20, deadline=None)
@given(n_tokens=st.integers(20, 400), seq_len=st.integers(2, 19), seed=st.integers(0, 3))
def test_each_epoch_visits_every_window_once_in_a_seeded_order(tmp_path_factory, n_tokens, seq_len, seed):
    pd = _packed(tmp_path_factory.mktemp("p"), n_tokens, seq_len, seed)
    n = pd.n_windows
    assert n == (n_tokens - 1) // seq_len
    for epoch in range(2):
        order = [pd.window_index(epoch * n + i) for i in range(n)]
        assert sorted(order) == list(range(n))
    again = data.PackedData(pd.shards.dir, seq_len, seed=seed)
    assert [again.window_index(g) for g in range(2 * n)] == [pd.window_index(g) for g in range(2 * n)]


CONVERSATION = {
    "tools": [{"type": "function", "function": {"name": "search", "description": "web search",
                                                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
    "messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should look it up.",
         "tool_calls": [{"id": "functions.search:0", "type": "function",
                         "function": {"name": "search", "arguments": "{\"q\": \"capital of France\"}"}}]},
        {"role": "tool", "tool_call_id": "functions.search:0", "content": "Paris is the capital of France."},
        {"role": "assistant", "content": "Paris.", "reasoning_content": "The tool says Paris."},
    ],
}


def test_sft_jsonl_is_rendered_in_k2_format_with_the_assistant_only_loss_mask(tmp_path):
    tok = load_tokenizer(None)
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n\n" + json.dumps(CONVERSATION) + "\n")
    meta = data.prepare(path, tmp_path / "out", kind="sft", val_every=0)
    assert meta["mask"] and meta["splits"]["train"]["tokens"] > 0
    shards = data.TokenShards(tmp_path / "out")
    ids, mask = shards.read(0, shards.n_tokens)
    ref_ids, ref_mask = render_ids(CONVERSATION["messages"], tok, tools=CONVERSATION["tools"])
    assert ids.tolist() == ref_ids * 2 and mask.tolist() == ref_mask * 2
    trained = tok.decode([i for i, k in zip(ref_ids, ref_mask) if k])
    assert "The tool says Paris." in trained and "capital of France?" not in trained  # no user text
    assert "Paris is the capital" not in trained  # no tool output
    # packed windows carry the mask of the *targets*
    pd = data.PackedData(tmp_path / "out", 32, shuffle=False)
    x, y, m = pd.batch(1, 1)
    assert m[0].tolist() == [bool(k) for k in mask[33:65]]


def test_bad_sft_lines_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n{not json\n")
    with pytest.raises(data.DataError, match=r"bad.jsonl:2"):
        data.prepare(path, tmp_path / "out", kind="sft")
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: no assistant message"):
        data.prepare(path, tmp_path / "out", kind="sft")
    for body, error in ((json.dumps(CONVERSATION).encode() + b"\n\xff\xfe{}\n", r"bad.jsonl:2: not UTF-8"),
                        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", r"bad.jsonl:1: not valid JSON")):
        path.write_bytes(body)
        with pytest.raises(data.DataError, match=error):
            data.prepare(path, tmp_path / "out", kind="sft")
    typo = {"messages": [{"role": "user", "content": "hi"}, {"role": "Assistant", "content": "x"},
                         {"role": "assistant", "content": "ok"}]}
    nan = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": float("nan")}}}]}]}
    for rec, error in ((typo, r"bad.jsonl:1: unknown role\(s\) \['Assistant'\]"), (nan, r"bad.jsonl:1: .*not JSON")):
        path.write_text(json.dumps(rec) + "\n")  # (Python's json writes and reads NaN)
        with pytest.raises(data.DataError, match=error):
            data.prepare(path, tmp_path / "out", kind="sft")
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CONVERSATION).encode() + b"\n")  # a byte-order mark is fine
    assert data.prepare(path, tmp_path / "bom", kind="sft")["splits"]["train"]["tokens"] > 0
    with pytest.raises(data.DataError, match=r"bad.jsonl is a JSONL file: for SFT conversations give --kind sft"):
        data.prepare(path, tmp_path / "as-text")  # kind="text", the default, would train on the JSON syntax


def test_cli_data_prepare_prints_a_json_summary(corpus, tmp_path, capsys):
    assert data.cli_data(["prepare", "--source", str(corpus), "--out", str(tmp_path / "o"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_tokens"] > 0 and summary["cached"] is False
    assert data.cli_data(["prepare", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_prepare_refuses_data_with_nothing_to_train_on(corpus, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(data.DataError, match="no training tokens"):
        data.prepare(tmp_path / "empty.jsonl", tmp_path / "e", kind="sft")
    with pytest.raises(data.DataError, match="--val-every 1 puts every document in the val split"):
        data.prepare(corpus, tmp_path / "v", val_every=1)
    assert not (tmp_path / "e").exists() and hidden(tmp_path) == []


def test_prepare_into_an_existing_file_is_refused_without_leaving_a_tmp_dir(corpus, tmp_path):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(data.DataError, match="is a file, not a data directory"):
        data.prepare(corpus, tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "keep me" and hidden(tmp_path) == []


def test_a_users_out_tmp_directory_is_not_touched(corpus, tmp_path):
    (tmp_path / "d.tmp").mkdir()
    (tmp_path / "d.tmp" / "notes.txt").write_text("mine")
    data.prepare(corpus, tmp_path / "d")
    data.prepare(corpus, tmp_path / "d", force=True)  # the replacing write too
    assert (tmp_path / "d.tmp" / "notes.txt").read_text() == "mine" and hidden(tmp_path) == []


def test_an_interrupted_write_leaves_nothing_behind(tmp_path):
    def docs():
        yield [1, 2, 3], None
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        data.write_dataset(tmp_path / "d", {"train": docs()}, 32768, False, {})
    assert list(tmp_path.iterdir()) == []


def test_prepare_with_an_unknown_tokenizer_names_it(corpus, tmp_path, capsys):
    for bad, why in (("nope", "not a model preset"), (str(tmp_path / "nope"), "no such tokenizer"),
                     (str(corpus), "no tiktoken.model")):
        assert data.cli_data(["prepare", "--source", str(corpus), "--out", str(tmp_path / "d"), "--tokenizer", bad]) == 2
        assert why in capsys.readouterr().err
    meta = data.prepare(corpus, tmp_path / "d")
    assert meta["tokenizer_dir"] is None  # moonlet's default: nothing to ship with checkpoints


def test_prepare_never_replaces_a_directory_that_is_not_moonlet_data_or_overlaps_the_source(corpus, tmp_path):
    before = sorted(p.relative_to(corpus) for p in corpus.rglob("*"))
    for out in (corpus, corpus / "sub", tmp_path):  # the source itself, inside it, holding it
        with pytest.raises(data.DataError, match="overlaps --source"):
            data.prepare(corpus, out, val_every=0)
    assert sorted(p.relative_to(corpus) for p in corpus.rglob("*")) == before
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "thesis.tex").write_text("years of work")
    assert data.cli_data(["prepare", "--source", str(corpus), "--out", str(project)]) == 2
    assert (project / "thesis.tex").read_text() == "years of work" and hidden(tmp_path) == []
    (tmp_path / "empty").mkdir()
    assert data.prepare(corpus, tmp_path / "empty", val_every=0)["splits"]["train"]["tokens"] > 0
    assert not data.prepare(corpus, tmp_path / "empty", val_every=0, force=True)["cached"]  # ours: replaced


def test_the_cache_is_not_reused_for_another_tokenizer_of_the_same_size(corpus, tmp_path):
    from moonlet.tokenizer import Tokenizer

    tok = load_tokenizer(None)
    first, second = sorted(tok.ranks, key=tok.ranks.get)[256:258]  # two merges swapped: same vocab size
    ranks = {**tok.ranks, first: tok.ranks[second], second: tok.ranks[first]}
    Tokenizer(ranks, tok.special).save(tmp_path / "swapped")
    a = data.prepare(corpus, tmp_path / "out", val_every=0)
    b = data.prepare(corpus, tmp_path / "out", val_every=0, tokenizer_path=str(tmp_path / "swapped"))
    assert not b["cached"] and b["fingerprint"] != a["fingerprint"]
