"""Helpers shared by the evaluations: held-out token batches and model activations (the SAE/model/store
compatibility checks are :mod:`sae.rundir.identity`).

Every evaluation runs on the *held-out* split of a dataset (``iter_documents(spec, "test")``,
documents never used for harvesting or training), packed into ``BOS``-first sequences exactly as
the harvest packs its training text (:func:`sae.harvest.tokens.pack_sequences`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..harvest.corpus import iter_documents
from ..harvest.tokens import pack_sequences
from ..model import (
    LoadedModel,
    hook_name_for,
    logits,
    splice,
)
from ..model import weights_fingerprint as _weights_fingerprint

# -- held-out tokens ------------------------------------------------------------------------------
MIN_DOCUMENTS = 200
"""Spread the held-out budget over at least this many documents when the split has them."""


@dataclass
class EvalSet:
    """Held-out sequences and where they come from.

    ``tokens [n_seq, T]`` int64 (each row ``BOS`` + ``T−1`` tokens of *one* document);
    ``doc_of_seq [n_seq]`` the index of its document in ``doc_ids`` / ``doc_sources``.
    """

    tokens: torch.Tensor
    doc_of_seq: np.ndarray
    doc_ids: list[str]
    doc_sources: list[str]

    @property
    def n_documents(self) -> int:
        return len(set(self.doc_of_seq.tolist()))

    def source_of_seq(self) -> list[str]:
        return [self.doc_sources[i] for i in self.doc_of_seq]


def load_eval_set(tokenizer: object, bos_token_id: int, dataset: str, context_size: int, n_tokens: int,
                  split: str = "test", seed: int = 0) -> EvalSet:
    """``ceil(n_tokens / context_size)`` held-out sequences spread over as many documents as possible.

    Each document is packed on its own (``BOS`` + the next ``T−1`` tokens, trailing partial
    sequence dropped, so a sequence never spans two documents). The budget is split across the
    dataset's sources in the training mix proportions (``EMBEDDED_WEIGHTS`` for the embedded
    corpus; one pool otherwise), and within a source taken breadth-first: every document's first
    sequence before any document's second. A source that runs out passes its share to the others.
    Documents are read in the split's seeded order until ``MIN_DOCUMENTS`` are available at
    ``ceil(n_seq / MIN_DOCUMENTS)`` sequences each, or the split ends. Memoised per tokenizer.

    Raises:
        ValueError: unknown dataset/split, or the split holds no full sequence.
    """
    from ..harvest.corpus import EMBEDDED_WEIGHTS

    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    n_seq = math.ceil(n_tokens / context_size)
    key = (id(tokenizer), bos_token_id, dataset, context_size, n_seq, split, seed)
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and hit[0]() is tokenizer:
        return hit[1]
    cap = max(1, math.ceil(n_seq / MIN_DOCUMENTS))
    per_doc: list[list[np.ndarray]] = []
    ids: list[str] = []
    sources: list[str] = []
    available = 0
    for d in iter_documents(dataset, split, seed):
        seqs = list(itertools.islice(pack_sequences([d.text], tokenizer, context_size, bos_token_id), n_seq))
        if not seqs:
            continue  # shorter than one sequence
        per_doc.append(seqs)
        ids.append(d.doc_id)
        sources.append(d.source)
        available += min(len(seqs), cap)
        if available >= n_seq and len(per_doc) >= MIN_DOCUMENTS:
            break
    if not per_doc:
        raise ValueError(f"dataset {dataset!r} split {split!r} holds no full sequence of {context_size} "
                         "tokens: use a larger dataset or a smaller --context-size")
    names = sorted(set(sources))
    weights = {n: EMBEDDED_WEIGHTS.get(n, 0.0) for n in names} if set(names) <= set(EMBEDDED_WEIGHTS) else {}
    if not weights or sum(weights.values()) <= 0:
        weights = {n: 1.0 for n in names}
        stratify = len(names) == 1
    else:
        stratify = True
    docs_of = {n: [i for i, src in enumerate(sources) if src == n] for n in names}
    if not stratify:  # several sources of unknown proportions: one pool in the split's order
        docs_of, weights = {"all": list(range(len(per_doc)))}, {"all": 1.0}
    picks: list[tuple[int, int]] = []  # (round r: the document's r-th sequence, document)
    depth = {n: 0 for n in docs_of}  # next round to take in each source
    used = {n: 0 for n in docs_of}  # documents of the current round already taken, per source
    remaining = n_seq

    def left(n: str) -> int:
        return sum(max(0, len(per_doc[i]) - depth[n]) for i in docs_of[n]) - used[n]

    live = [n for n in docs_of if left(n) > 0]
    while remaining > 0 and live:
        total_w, budget = sum(weights[n] for n in live), remaining
        for n in live:
            want = min(remaining, max(1, round(budget * weights[n] / total_w)), left(n))
            while want > 0:  # breadth-first: round depth[n] of every document before round depth[n] + 1
                row = [i for i in docs_of[n] if len(per_doc[i]) > depth[n]]
                take = row[used[n]:used[n] + want]
                picks.extend((depth[n], i) for i in take)
                used[n] += len(take)
                want -= len(take)
                remaining -= len(take)
                if used[n] >= len(row):
                    depth[n], used[n] = depth[n] + 1, 0
                if not take:
                    break
            if remaining <= 0:
                break
        live = [n for n in live if left(n) > 0]
    picks.sort()
    out = EvalSet(tokens=torch.from_numpy(np.stack([per_doc[i][r] for r, i in picks])).long(),
                  doc_of_seq=np.asarray([i for _, i in picks], dtype=np.int64), doc_ids=ids, doc_sources=sources)
    with contextlib.suppress(TypeError):  # a tokenizer that cannot be weak-referenced is not memoised
        _TOKEN_CACHE[key] = (weakref.ref(tokenizer), out)
    return out



_TOKEN_CACHE: dict[tuple, tuple[weakref.ref, EvalSet]] = {}


def non_special_mask(tokens: torch.Tensor, special_token_ids: Sequence[int]) -> torch.Tensor:
    """Bool mask (same shape as ``tokens``) of positions whose token is not special (BOS/EOS/PAD/...)."""
    if not len(special_token_ids):
        return torch.ones_like(tokens, dtype=torch.bool)
    special = torch.as_tensor(list(special_token_ids), dtype=tokens.dtype, device=tokens.device)
    return ~torch.isin(tokens, special)


def batches(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices covering ``range(n)`` in steps of ``batch_size``."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as one right-padded batch: ``(ids [n, max_len], attention_mask [n, max_len])``,
    both int64, the mask 1 on real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[j, :len(r)] = 1
    return ids, mask


# -- model activations ----------------------------------------------------------------------------
@torch.no_grad()
def forward_with_capture(lm: LoadedModel, input_ids: torch.Tensor, layer: int,
                         patch: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward → ``(logits [B, T, vocab] float32, resid_post [B, T, d_model] float32)``.

    The activation is recorded (on the model's device) as it leaves block ``layer``; ``patch``, if
    given, then replaces it (the recorded value is the one *before* patching) — so a clean forward
    and its activations cost one pass (``patch=None``).
    """
    captured: list[torch.Tensor] = []

    def fn(h: torch.Tensor) -> torch.Tensor:
        captured.append(h.detach().float())
        return patch(h) if patch is not None else h

    with splice(lm.model, layer, fn):
        out = logits(lm.model, input_ids.to(lm.device))
    return out, captured[0]


def model_hook_names(lm: LoadedModel) -> list[str]:
    """Every ``resid_post`` hook the model offers: ``blocks.0..n_layers-1.hook_resid_post``."""
    return [hook_name_for(L) for L in range(lm.n_layers)]


def model_fingerprints(lm: LoadedModel) -> set[str]:
    """Fingerprints under which ``lm``'s weights may have been recorded.

    ``sae.model.weights_fingerprint`` hashes weights in the dtype they were loaded in, and
    ``load_model`` picks bfloat16 on CUDA and float32 on CPU: a store harvested on a GPU records
    the bfloat16 fingerprint of the same weights. For a float32 model we therefore also accept the
    fingerprints of its bfloat16 and float16 roundings (computed one parameter at a time, memoised
    per model object).
    """
    cached = _FINGERPRINTS.get(lm.model)
    if cached is not None and lm.fingerprint in cached:
        return set(cached)
    fps = {lm.fingerprint}
    if next(lm.model.parameters()).dtype == torch.float32:
        for dt in (torch.bfloat16, torch.float16):
            fps.add(_weights_fingerprint(_CastView(lm.model, dt)))  # type: ignore[arg-type]
    _FINGERPRINTS[lm.model] = fps
    return set(fps)


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _CastView:
    """Just enough of a module for ``weights_fingerprint``: ``config`` and cast ``named_parameters``."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.config = getattr(model, "config", None)
        self._model, self._dtype = model, dtype

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self._model.named_parameters():
            yield name, p.detach().to(self._dtype)


