"""`search` and `open` over a local document collection: an SQLite FTS5 index ranked by BM25.

`moonlet index DIR --out INDEX.sqlite` indexes the .txt/.md/.html files under DIR (a document's id is its
path relative to DIR; its title is the markdown `# heading`, the HTML <title>/<h1>, or the first line).
`search(query, k)` returns the k best documents with a snippet around the matched words; `open(id, page)`
returns one page of a document, pages being fixed-size runs of whole lines (a fact written on one line is
never cut in two), headed "page i of n" so the model knows how much is left.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from moonlet.tokenizer import decode_text

TEXT_EXTS = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html",
             ".htm": "html"}
PAGE_CHARS = 3000
TITLE_WEIGHT = 5.0  # a query word in the title counts this many times one in the body


class _HTMLText(HTMLParser):
    """Visible text of an HTML page, block elements on their own lines; the <title> kept apart."""

    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre",
              "table", "ul", "ol", "header", "footer", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title, self.h1 = "", ""
        self._skip, self._in = 0, ""

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        if tag in ("title", "h1"):
            self._in = tag
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        if tag == self._in:
            self._in = ""
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._in == "title":
            self.title += data
            return
        if self._in == "h1":
            self.h1 += data
        self.parts.append(data)


def document_files(docs_dir: Path) -> list[Path]:
    """The text/markdown/html files under docs_dir, skipping hidden folders and files (.git, .cache) and links
    that lead outside docs_dir (a link to /etc/passwd must not become searchable)."""
    root = docs_dir.resolve()
    files = []
    for p in sorted(docs_dir.rglob("*")):
        rel = p.relative_to(docs_dir)
        if p.suffix.lower() not in TEXT_EXTS or any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.is_symlink() and not p.resolve().is_relative_to(root):
            continue
        files.append(p)
    return files


def read_document(path: Path) -> tuple[str, str]:
    """(title, text) of one file."""
    raw = decode_text(path.read_bytes())
    kind = TEXT_EXTS[path.suffix.lower()]
    if kind == "html":
        p = _HTMLText()
        p.feed(raw)
        text = re.sub(r"[ \t]+", " ", "".join(p.parts))
        text = "\n".join(line.strip() for line in text.splitlines())
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        title = (p.title or p.h1).strip()
    else:
        text = raw.strip()
        m = re.search(r"^#\s+(.+)$", text, re.M) if kind == "markdown" else None
        title = m.group(1).strip() if m else ""
    if not title:
        title = next((line.strip().lstrip("#").strip() for line in text.splitlines() if line.strip()), path.stem)
    return html.unescape(title)[:200], text


def build_index(docs_dir: str | Path, out: str | Path, progress: bool = False) -> dict:
    """Index every text/markdown/html file under docs_dir into a new SQLite file `out` (written atomically)."""
    docs_dir, out = Path(docs_dir), Path(out)
    if not docs_dir.is_dir():
        raise FileNotFoundError(f"moonlet index: {docs_dir} is not a directory")
    if out.is_dir():
        raise IsADirectoryError(f"moonlet index: --out {out} is a directory; give the index file's path")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"moonlet index: --out {out}: folder {out.parent} does not exist")
    files = document_files(docs_dir)
    t0 = time.time()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    ok = False
    try:
        db.executescript(
            "CREATE TABLE docs(id TEXT PRIMARY KEY, title TEXT, body TEXT);"
            "CREATE VIRTUAL TABLE fts USING fts5(title, body, content='docs', content_rowid='rowid',"
            " tokenize='unicode61 remove_diacritics 2');")
        it = files
        if progress:
            from tqdm import tqdm

            it = tqdm(files, desc="index", unit="doc")
        chars = 0
        for p in it:
            title, text = read_document(p)
            chars += len(text)
            cur = db.execute("INSERT INTO docs(id, title, body) VALUES (?, ?, ?)",
                             (p.relative_to(docs_dir).as_posix(), title, text))
            db.execute("INSERT INTO fts(rowid, title, body) VALUES (?, ?, ?)", (cur.lastrowid, title, text))
        db.execute("INSERT INTO fts(fts) VALUES ('optimize')")
        db.commit()
        ok = True
    finally:
        db.close()
        if not ok:
            tmp.unlink(missing_ok=True)
    os.replace(tmp, out)
    return {"docs": len(files), "chars": chars, "index": str(out), "bytes": out.stat().st_size,
            "seconds": round(time.time() - t0, 3)}


@dataclass
class Hit:
    id: str
    title: str
    snippet: str
    score: float  # BM25 (higher is better here)


def query_terms(query: str) -> list[str]:
    """The "quoted phrases" and the other words of a free-text query, each once."""
    phrases = re.findall(r'"([^"]+)"', query)
    words = re.findall(r"\w+", re.sub(r'"[^"]*"', " ", query))
    terms = [" ".join(re.findall(r"\w+", p)) for p in phrases] + words
    return list(dict.fromkeys(t for t in terms if t))


def fts_query(query: str) -> str:
    """A free-text query as an FTS5 expression: phrases kept, words OR-ed (BM25 ranks docs that match more
    and rarer words first), so punctuation in the query can never be a syntax error."""
    return " OR ".join(f'"{t}"' for t in query_terms(query))


def snippet(body: str, terms: list[str], words: int = 24) -> str:
    """About `words` words of body around the first match of a term, "..." where text is left out. (FTS5's
    snippet() takes time quadratic in a document's matches: 10 s on a 250 KB file repeating the word.)"""
    pattern = "|".join(r"\b" + r"\W+".join(map(re.escape, t.split())) + r"\b" for t in terms)
    m = re.search(pattern, body, re.IGNORECASE) if pattern else None
    at = m.start() if m else 0  # (a match only FTS sees, e.g. across diacritics: the start of the body)
    reach = 40 * words  # characters each side that surely hold enough words
    before = body[max(0, at - reach): at].split()
    after = body[at: at + reach].split()
    left = before[len(before) - words // 3:] if before else []
    right = after[: words - len(left)]
    head = " ... " if at > reach or len(before) > len(left) else ""
    tail = " ... " if at + reach < len(body) or len(after) > len(right) else ""
    return (head + " ".join(left + right) + tail).strip()


class Index:
    """Read-only access to an index file; safe to share across threads (one connection per call)."""

    def __init__(self, path: str | Path, page_chars: int = PAGE_CHARS):
        self.path, self.page_chars = Path(path), page_chars
        if not self.path.is_file():
            raise FileNotFoundError(f"search index {self.path} not found; build it with `moonlet index DIR --out "
                                    f"{self.path}`")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        terms = query_terms(query)
        if not terms:
            return []
        with self._db() as db:
            rows = db.execute(
                f"SELECT d.id, d.title, d.body, bm25(fts, {TITLE_WEIGHT}, 1.0) AS s"
                " FROM fts JOIN docs d ON d.rowid = fts.rowid WHERE fts MATCH ? ORDER BY s LIMIT ?",
                (fts_query(query), max(1, k))).fetchall()
        return [Hit(i, t, snippet(body, terms), -score) for i, t, body, score in rows]

    def document(self, doc_id: str) -> tuple[str, str] | None:
        with self._db() as db:
            row = db.execute("SELECT title, body FROM docs WHERE id = ?", (doc_id,)).fetchone()
        return row

    def pages(self, text: str) -> list[str]:
        """Split into pages of at most page_chars, at line ends (a longer line is cut)."""
        pages, cur = [], ""
        for line in text.splitlines(keepends=True):
            while len(line) > self.page_chars:
                if cur:
                    pages.append(cur)
                    cur = ""
                pages.append(line[: self.page_chars])
                line = line[self.page_chars:]
            if len(cur) + len(line) > self.page_chars:
                pages.append(cur)
                cur = ""
            cur += line
        if cur or not pages:
            pages.append(cur)
        return pages

    def open(self, doc_id: str, page: int = 1) -> tuple[str, str, int, int]:
        """(title, page text, page, n_pages); KeyError/IndexError name what is wrong."""
        row = self.document(doc_id)
        if row is None:
            raise KeyError(doc_id)
        pages = self.pages(row[1])
        if not 1 <= page <= len(pages):
            raise IndexError(f"page {page} out of range: {doc_id!r} has {len(pages)} page(s)")
        return row[0], pages[page - 1], page, len(pages)

    def similar_ids(self, doc_id: str, n: int = 3) -> list[str]:
        with self._db() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM docs")]
        import difflib

        return difflib.get_close_matches(doc_id, ids, n=n, cutoff=0.5)


def index_for(docs_dir: str | Path) -> Path:
    """An index of a document folder, kept in the temp dir and rebuilt when a file changed (for tools that
    are given a folder rather than a `moonlet index` file)."""
    import hashlib
    import tempfile

    docs_dir = Path(docs_dir).resolve()
    files = document_files(docs_dir)
    # named by the folder and by what is in it (names, sizes, times): any added, changed, renamed or deleted
    # file gives another name, so the index is rebuilt, and the older ones of this folder are removed
    stats = [(p.relative_to(docs_dir), p.stat()) for p in files]
    contents = hashlib.sha1("\n".join(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}" for rel, st in stats)
                            .encode()).hexdigest()[:16]
    stem = f"moonlet-index-{hashlib.sha1(str(docs_dir).encode()).hexdigest()[:16]}"
    out = Path(tempfile.gettempdir()) / f"{stem}-{contents}.sqlite"
    if not out.exists():
        build_index(docs_dir, out)
        for old in out.parent.glob(f"{stem}-*.sqlite"):
            if old != out:
                old.unlink(missing_ok=True)
    return out


def search_tools(index_path: str | Path, page_chars: int = PAGE_CHARS, default_k: int = 5) -> list:
    """The `search` and `open` Tools over one index file (or a folder of documents, indexed on first use)."""
    from moonlet.agent.tools import Tool, ToolError

    if Path(index_path).is_dir():
        index_path = index_for(index_path)
    index = Index(index_path, page_chars)

    def search(query: str, k: int = default_k) -> str:
        """Search the document collection (BM25 over titles and text). Returns the best documents with
        their ids, titles and a snippet around the matched words; read one with open(id).

        Args:
            query: words to look for; put "exact phrases" in double quotes.
            k: how many results to return (1-20).
        """
        hits = index.search(query, min(max(k, 1), 20))
        if not hits:
            return f"no documents match {query!r}; try other or fewer words"
        return "\n".join(f"{i}. [{h.id}] {h.title}\n   {h.snippet}" for i, h in enumerate(hits, 1))

    def open(id: str, page: int = 1) -> str:  # the tool is called `open` (shadows the builtin here only)
        """Read a document from the collection by its id (as shown by search), one page at a time.

        Args:
            id: the document id, e.g. "people/ada.md".
            page: which page to read, from 1.
        """
        try:
            title, text, i, n = index.open(id, page)
        except KeyError:
            close = index.similar_ids(id)
            raise ToolError(f"no document with id {id!r}" + (f"; did you mean {close}?" if close else
                                                              "; use the ids that search returns")) from None
        except IndexError as e:
            raise ToolError(str(e)) from None
        more = f"\n\n[page {i} of {n}; open(id={id!r}, page={i + 1}) for more]" if i < n else \
            f"\n\n[page {i} of {n}; end of document]"
        return f"[{id}] {title} (page {i} of {n})\n\n{text.rstrip()}{more}"

    return [Tool.from_function(search), Tool.from_function(open)]


def cli_index(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="moonlet index",
        description="Build an SQLite FTS5 (BM25) index over the .txt/.md/.html files under DIR, for the "
                    "agent's `search` and `open` tools (moonlet agent --docs INDEX.sqlite).")
    ap.add_argument("dir", help="folder of documents (searched recursively)")
    ap.add_argument("--out", required=True, help="index file to write, e.g. docs.sqlite (replaced atomically)")
    ap.add_argument("--json", action="store_true", help="print one JSON object with the counts as the last line")
    args = ap.parse_args(argv)
    try:
        info = build_index(args.dir, args.out, progress=not args.json)
    except (OSError, sqlite3.Error) as e:
        print(e if str(e).startswith("moonlet index") else f"moonlet index: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
    else:
        print(f"indexed {info['docs']} documents ({info['chars']:,} characters) into {info['index']} "
              f"in {info['seconds']} s")
    return 0
