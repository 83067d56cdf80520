"""The sparse co-firing pair engine (``train/variants/pairs.py``) against dense references."""

from __future__ import annotations

import pytest
import torch

from sae.train.variants.pairs import cofiring_pairs, cofiring_penalty, merge_sparse, occurrence_keys
from tests import reference_penalties as ref
from tests.penalty_helpers import assert_close_val_grad, make_codes, unit_rows

ACTS = ("topk", "relu")
pytestmark = pytest.mark.usefixtures("one_thread")


# -- shared sparse machinery ----------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
def test_cofiring_pairs_match_dense_counts_and_scores(act: str) -> None:
    F = 48
    codes = make_codes(act, F)
    cof = cofiring_pairs(codes, F, with_scores=True)
    C = ref.cofire_counts(codes, F)
    f = ref.dense(codes, F)
    S = f.T @ f
    m = (C > 0) & ref.upper(F)
    ii, jj = m.nonzero(as_tuple=True)
    assert torch.equal(cof.keys, ii * F + jj)  # unique, sorted, i < j only
    assert bool((cof.i < cof.j).all())
    assert torch.equal(cof.counts, C[ii, jj].long())
    torch.testing.assert_close(cof.scores.double(), S[ii, jj], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ACTS)
def test_occurrence_keys_group_to_cofiring_counts(act: str) -> None:
    F = 48
    codes = make_codes(act, F)
    occ = occurrence_keys(codes, F)
    cof = cofiring_pairs(codes, F)
    keys, counts = torch.unique(occ, return_counts=True)
    assert torch.equal(keys, cof.keys) and torch.equal(counts, cof.counts)
    assert occ.numel() == int(cof.counts.sum())
    # merging unsorted occurrences into a sorted sparse vector sums them
    base_k, base_v = cof.keys[::2], torch.full_like(cof.keys[::2], 10)
    mk, mv = merge_sparse(base_k, base_v, occ, torch.ones_like(occ), b_sorted=False)
    assert torch.equal(mk, cof.keys)
    want = cof.counts.clone()
    want[::2] += 10
    assert torch.equal(mv, want)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("power", (1, 2))
def test_pair_and_token_paths_agree(act: str, power: int) -> None:
    F = 48
    W = unit_rows(F, 12, shared=0.5)
    codes = make_codes(act, F)
    cof = cofiring_pairs(codes, F)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(cof.n_pairs, generator=g)
    w[::4] = 0
    tau = 0.3 * torch.rand(cof.n_pairs, generator=g)
    cos = ref.cosines(W)[cof.i, cof.j]
    want = (w.double() * (cos.abs() - tau.double()).clamp_min(0) ** power).sum()
    for path in ("pairs", "tokens"):
        val, sel, c = cofiring_penalty(W, cof, w, tau, power, path=path)
        assert_close_val_grad(val, want, W)
        torch.testing.assert_close(c.double(), cos[sel].detach(), rtol=1e-5, atol=1e-6)


# -- topk_pairs -----------------------------------------------------------------------------------


def test_no_variant_imports_another_variant() -> None:
    """Shared machinery lives in pairs/chunks/base; a variant file imports no other variant's module."""
    import ast
    from pathlib import Path

    from sae.train.variants import VARIANTS

    VARIANT_MODULES = VARIANTS.modules

    root = Path(__file__).resolve().parents[1] / "train" / "variants"
    for name in VARIANT_MODULES:
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        assert not imported & set(VARIANT_MODULES), (name, imported)
