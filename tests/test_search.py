"""The SQLite FTS5 index behind `search` and `open`, on a real collection written by the test."""

import json
import os
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from moonlet.agent.search import Index, build_index, cli_index, fts_query, index_for, search_tools, snippet
from moonlet.agent.tools import ToolError

DOCS = {
    "animals/otter.md": "# Sea otter\n\nThe sea otter is a marine mammal of the North Pacific. It uses stones to "
                        "crack shellfish and holds hands with others while sleeping.\n",
    "animals/heron.txt": "Grey heron\nA long-legged wading bird that hunts fish in shallow water.\n",
    "places/kyoto.html": "<html><head><title>Kyoto &amp; its temples</title><style>.x{color:red}</style>"
                         "<script>var hidden = 'xylophone';</script></head><body><h1>Kyoto</h1><p>Kyoto was the "
                         "imperial capital of Japan for over a thousand years.</p><p>Famous for Kinkaku-ji."
                         "</p></body></html>",
    "places/osaka.md": "# Osaka\n\nOsaka is a port city known for street food such as takoyaki. The capital "
                       "of the prefecture.\n",
    "code/cpp.md": "# C++ notes\n\nWhat's new in C++20: concepts, ranges and coroutines.\n",
    "notes/skip.bin": "binary otter otter otter",  # not a text extension: not indexed
}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    docs = root / "docs"
    for rel, text in DOCS.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(text)
    long_lines = [f"Line {i:04d} of the long report: the harbour ledger records cargo number {i * 7}." for i in range(400)]
    long_lines[333] = "Line 0333 says the secret cargo was a crate of saffron."
    (docs / "reports" / "long.md").parent.mkdir()
    (docs / "reports" / "long.md").write_text("# Harbour report\n\n" + "\n".join(long_lines) + "\n")
    info = build_index(docs, root / "index.sqlite")
    return root, info, long_lines


def test_index_holds_every_text_markdown_and_html_file_and_nothing_else(collection):
    root, info, _ = collection
    assert info["docs"] == 6
    ids = {r[0] for r in sqlite3.connect(root / "index.sqlite").execute("SELECT id FROM docs")}
    assert ids == {k for k in DOCS if not k.endswith(".bin")} | {"reports/long.md"}


def test_search_ranks_the_document_that_answers_first(collection):
    idx = Index(collection[0] / "index.sqlite")
    assert idx.search("otter shellfish stones")[0].id == "animals/otter.md"
    assert idx.search("wading bird")[0].id == "animals/heron.txt"
    assert idx.search("imperial capital of Japan")[0].id == "places/kyoto.html"
    assert idx.search("saffron crate")[0].id == "reports/long.md"
    assert idx.search("takoyaki", k=3)[0].title == "Osaka"
    assert len(idx.search("the", k=2)) == 2


def test_titles_outweigh_body_mentions(collection):
    # "capital" is in the body of both Kyoto and Osaka; "Osaka" in Osaka's title wins a query naming both
    idx = Index(collection[0] / "index.sqlite")
    assert [h.id for h in idx.search("Osaka capital", k=2)][0] == "places/osaka.md"


def test_html_is_indexed_as_visible_text_with_its_title(collection):
    idx = Index(collection[0] / "index.sqlite")
    title, text = idx.document("places/kyoto.html")
    assert title == "Kyoto & its temples"
    assert "imperial capital" in text and "color:red" not in text
    assert idx.search("xylophone") == []  # script contents are not text


def test_queries_with_punctuation_and_phrases_never_break_fts(collection):
    idx = Index(collection[0] / "index.sqlite")
    assert idx.search("What's new in C++20? (concepts)")[0].id == "code/cpp.md"
    assert fts_query('say "sea otter" now-ish') == '"sea otter" OR "say" OR "now" OR "ish"'
    assert idx.search('"marine mammal"')[0].id == "animals/otter.md"
    assert idx.search('"mammal marine"') == []  # a phrase is a phrase
    assert idx.search("?!*") == [] and idx.search("") == []


def test_search_tool_returns_ids_titles_and_snippets(collection):
    search, _ = search_tools(collection[0] / "index.sqlite")
    out = search({"query": "sea otter", "k": 2})
    assert out.startswith("1. [animals/otter.md] Sea otter\n   ")
    assert "marine mammal" in out
    assert "no documents match" in search({"query": "zzzqqq"})


def test_a_snippet_shows_the_words_around_the_first_match_and_marks_what_it_leaves_out(collection):
    idx = Index(collection[0] / "index.sqlite")
    assert "secret cargo was a crate of saffron" in idx.search("saffron")[0].snippet
    assert idx.search("saffron")[0].snippet.startswith("... ")
    body = "filler " * 5000 + "the striped zebra sleeps. " + "zebra " * 50_000  # 300 KB, 50k matches
    cut = snippet(body, ["striped zebra"], words=6)
    assert cut == "... filler the striped zebra sleeps. zebra ..."  # a third of the words before the match
    assert snippet("a b c", ["nothing"]) == "a b c" and snippet("", ["x"]) == ""


def test_open_pages_long_documents_at_line_ends(collection):
    root, _, lines = collection
    idx = Index(root / "index.sqlite", page_chars=1000)
    _, text = idx.document("reports/long.md")
    pages = idx.pages(text)
    assert len(pages) > 5 and "".join(pages) == text
    assert all(len(p) <= 1000 for p in pages)
    assert all(p.endswith("\n") for p in pages[:-1])  # a line is never cut in two
    _, open_ = search_tools(root / "index.sqlite", page_chars=1000)
    first = open_({"id": "reports/long.md"})
    assert first.startswith(f"[reports/long.md] Harbour report (page 1 of {len(pages)})")
    assert "open(id='reports/long.md', page=2)" in first
    found = [i for i in range(1, len(pages) + 1) if "saffron" in open_({"id": "reports/long.md", "page": i})]
    assert len(found) == 1
    last = open_({"id": "reports/long.md", "page": len(pages)})
    assert last.endswith(f"[page {len(pages)} of {len(pages)}; end of document]") and lines[-1] in last


def test_open_errors_tell_the_model_what_to_do(collection):
    _, open_ = search_tools(collection[0] / "index.sqlite")
    with pytest.raises(ToolError, match=r"did you mean \['animals/otter.md'"):
        open_({"id": "animals/otter"})
    with pytest.raises(ToolError, match="page 9 out of range: 'places/osaka.md' has 1 page"):
        open_({"id": "places/osaka.md", "page": 9})


def test_tools_given_a_folder_index_it_once_and_again_after_a_change(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Alpha\n\nabout apples")
    search, _ = search_tools(docs)
    assert "[a.md] Alpha" in search({"query": "apples"})
    time.sleep(0.01)
    (docs / "b.md").write_text("# Beta\n\nabout bananas")
    os.utime(docs / "b.md", (time.time() + 5, time.time() + 5))
    search, _ = search_tools(docs)
    assert "[b.md] Beta" in search({"query": "bananas"})
    index_for(docs).unlink()  # the cache lives in the temp dir; leave nothing behind


def test_a_folder_index_follows_deleted_and_renamed_files(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("alpha zebra")
    (docs / "b.txt").write_text("beta yak")
    search, _ = search_tools(docs)
    assert "[a.txt]" in search({"query": "zebra"})
    (docs / "a.txt").unlink()
    (docs / "b.txt").rename(docs / "c.txt")  # a rename keeps the newest mtime as it was
    search, open_ = search_tools(docs)
    hits = search({"query": "zebra yak"})
    assert "[c.txt]" in hits and "a.txt" not in hits and "b.txt" not in hits
    assert "yak" in open_({"id": "c.txt"})
    index_for(docs).unlink()


def test_latin_documents_keep_their_accents_and_hidden_or_outside_files_stay_out(tmp_path):
    docs, outside = tmp_path / "docs", tmp_path / "secret.txt"
    (docs / ".git").mkdir(parents=True)
    (docs / "menu.txt").write_bytes("le café du coin".encode("cp1252"))
    (docs / ".git" / "notes.txt").write_text("hidden walrus")
    outside.write_text("outside walrus")
    (docs / "link.txt").symlink_to(outside)
    info = build_index(docs, tmp_path / "i.sqlite")
    index = Index(tmp_path / "i.sqlite")
    assert info["docs"] == 1 and [h.id for h in index.search("café")] == ["menu.txt"]
    assert index.search("walrus") == []


def test_cli_index_names_a_bad_out_path_and_leaves_no_temp_file(collection, tmp_path, capsys):
    docs = collection[0] / "docs"
    for out in (tmp_path / "no" / "such" / "x.sqlite", tmp_path):
        assert cli_index([str(docs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "is a directory" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_missing_index_names_the_command_that_builds_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="moonlet index"):
        search_tools(tmp_path / "nope.sqlite")


def test_searches_from_many_threads_share_one_index(collection):
    search, _ = search_tools(collection[0] / "index.sqlite")
    queries = ["sea otter", "wading bird", "Kyoto", "takoyaki"] * 10
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda q: search({"query": q, "k": 1}), queries))
    assert [re.search(r"\[(.+?)\]", o).group(1) for o in outs[:4]] == [
        "animals/otter.md", "animals/heron.txt", "places/kyoto.html", "places/osaka.md"]
    assert outs[4:8] == outs[:4]


def test_cli_index_builds_atomically_and_reports_json(collection, tmp_path, capsys):
    docs = collection[0] / "docs"
    out = tmp_path / "cli.sqlite"
    out.write_text("old junk")  # replaced, never appended to
    assert cli_index([str(docs), "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["docs"] == 6 and info["index"] == str(out)
    assert Index(out).search("heron")[0].id == "animals/heron.txt"
    assert not list(tmp_path.glob("*.tmp*"))
    assert cli_index([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_moonlet_cli_dispatches_index(collection, tmp_path, capsys):
    from moonlet.cli import main

    assert main(["index", str(collection[0] / "docs"), "--out", str(tmp_path / "x.sqlite"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["docs"] == 6
