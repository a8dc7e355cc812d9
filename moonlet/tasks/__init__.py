"""Procedurally generated, verifiable agentic tasks with a difficulty dial, and their graders.

    tasks = make_tasks("multihop", 10, difficulty=30, seed=0, workdir="runs/tasks")  # 30 sequential lookups
    tools = task_tools(tasks[0])          # search/open over the task's collection (index built once)
    grade(tasks[0], model_answer)         # exact match after normalisation; BrowseComp format aware

Kinds: "multihop" (alias "lookup": search/open over a generated collection; difficulty = k, the number of
people the object passes through = the minimum number of sequential lookups) and "python" (alias "arith":
arithmetic and data questions for the python tool; difficulty scales the sizes).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

KINDS = ("multihop", "python")
ALIASES = {"lookup": "multihop", "search": "multihop", "arith": "python", "compute": "python", "data": "python"}

# BrowseComp's answer format (append it to a question to ask for it; parse_browsecomp reads it back)
BROWSECOMP_FORMAT = ("Your response should be in the following format:\n"
                     "Explanation: {your explanation for your final answer}\n"
                     "Exact Answer: {your succinct, final answer}\n"
                     "Confidence: {your confidence score between 0% and 100% for your answer}")


@dataclass
class Task:
    id: str
    kind: str
    question: str
    answer: str
    tools: list[str]
    steps_needed: int  # the fewest tool calls that can find the answer
    docs_dir: str | None = None  # collection to index for search/open tasks
    meta: dict = field(default_factory=dict)  # for checking the generator, never shown to the model


def make_tasks(kind: str, n: int, *, difficulty: int, seed: int, workdir: str | Path) -> list[Task]:
    """n tasks of one kind. Deterministic in (kind, n, difficulty, seed); multihop writes its collection
    under workdir/multihop-d{difficulty}-s{seed}-n{n}/docs."""
    kind = ALIASES.get(kind, kind)
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    if kind == "multihop":
        from moonlet.tasks import multihop

        docs = Path(workdir) / f"multihop-d{difficulty}-s{seed}-n{n}" / "docs"
        items = multihop.generate(n, difficulty, seed, docs)
        return [Task(f"multihop-d{difficulty}-s{seed}-{i}", kind, t["question"], t["answer"], ["search", "open"],
                     difficulty, str(docs), {"chain": t["chain"], "object": t["object"]})
                for i, t in enumerate(items)]
    if kind == "python":
        from moonlet.tasks import compute

        return [Task(f"python-{t['template']}-d{difficulty}-s{seed}-{i}", kind, t["question"], t["answer"],
                     ["python"], 1, None, {"template": t["template"], "program": t["program"]})
                for i, t in enumerate(compute.generate(n, difficulty, seed))]
    raise ValueError(f"unknown task kind {kind!r}; choose one of {KINDS} (or an alias: {sorted(ALIASES)})")


_index_lock = threading.Lock()


def task_tools(task: Task, **python_kw) -> list:
    """The Tools a task is meant to be solved with; builds the collection's index on first use."""
    tools = []
    if task.docs_dir is not None:
        from moonlet.agent.search import build_index, search_tools

        index = Path(task.docs_dir).parent / "index.sqlite"
        with _index_lock:
            if not index.exists():
                build_index(task.docs_dir, index)
        tools += search_tools(index)
    if "python" in task.tools:
        from moonlet.agent.sandbox import python_tool

        tools.append(python_tool(**python_kw))
    return tools


# ------------------------------------------------------------------------------------------------ grading

def parse_browsecomp(response: str) -> dict:
    """{"explanation", "exact_answer", "confidence" (0..1)} from a BrowseComp-format response; missing
    fields are None. Tolerates markdown bold and different capitalisation."""
    def field_(name: str) -> str | None:
        """The last such field (a restated answer wins); its value may start on the next line."""
        found = list(re.finditer(rf"^[ \t>*_#-]*{name}[ \t*_]*:[ \t*_]*(.*?)[ \t*_]*$", response, re.I | re.M))
        if not found:
            return None
        value = found[-1].group(1).strip()
        if not value:
            rest = response[found[-1].end():].lstrip("\n").split("\n", 1)[0]
            value = rest.strip(" \t*_")
        return value

    conf = field_("Confidence")
    num = re.search(r"\d+(?:\.\d+)?", conf or "")
    confidence = None
    if num:
        value = float(num.group())
        confidence = min(1.0, value / 100 if "%" in conf or value > 1 else value)
    expl = re.search(r"Explanation[ \t*_]*:[ \t*_]*(.*?)(?=^[ \t>*_#-]*Exact Answer|\Z)", response, re.I | re.S | re.M)
    return {"explanation": expl.group(1).strip() if expl else None, "exact_answer": field_("Exact Answer"),
            "confidence": confidence}


def final_answer(response: str) -> str:
    """The answer part of a model's final message: BrowseComp's Exact Answer, a \\boxed{} or the text."""
    exact = parse_browsecomp(response)["exact_answer"]
    if exact:
        return exact
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", response)
    return boxed[-1] if boxed else response


def normalize(answer: str) -> str:
    """Lowercase, trim quotes/markdown/trailing dots, collapse spaces, drop thousands separators."""
    s = answer.strip().lower()
    s = re.sub(r"^[*_\s]*(the )?(final |exact )?answer( is)?[*_\s]*[:=]?[*_\s]*", "", s)  # **Answer:** 42
    s = s.strip(" \t\n`*_\"'“”‘’.")
    s = re.sub(r"^[$€£]\s*(?=\d)", "", s)  # $1,234.50 is the number 1234.50
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    return " ".join(s.split())


def _number(s: str) -> Decimal | None:
    try:
        return Decimal(s) if re.fullmatch(r"[-+]?\d+(\.\d+)?", s) else None
    except InvalidOperation:
        return None


def grade(task: Task, final_answer_text: str) -> bool:
    """Exact match after normalisation (numbers compare by value: 12.5 == 12.50)."""
    got, want = normalize(final_answer(final_answer_text or "")), normalize(task.answer)
    if got == want:
        return True
    a, b = _number(got), _number(want)
    return a is not None and a == b
