"""The six orthogonality variants against the dense references of ``tests/reference_penalties.py``.

Small F (≤ 96) and B (≤ 256) throughout; the temporal stream is 4096 tokens of width-64 codes.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from sae.rundir.sae import SparseCodes
from sae.train.variants import PenaltyContext, build_penalty, make_config, variant_names
from sae.train.variants.adaptive import greedy_groups, group_condition_numbers
from sae.train.variants.chunks import random_chunks
from sae.train.variants.ortsae import chunk_partners
from sae.train.variants.pairs import cofiring_pairs, jaccard
from sae.train.variants.progressive import lambda2, threshold
from sae.train.variants.topk_pairs import n_keep
from tests import reference_penalties as ref
from tests.penalty_helpers import assert_close_val_grad, grads, make_codes, unit_rows

VARIANTS = ("topk_pairs", "adaptive", "progressive", "temporal", "static_ortho", "ortsae")
ACTS = ("topk", "relu")
pytestmark = pytest.mark.usefixtures("one_thread")


def ctx_for(W: torch.Tensor, codes: SparseCodes, step: int = 0, total: int = 100, seed: int = 0
            ) -> PenaltyContext:
    return PenaltyContext(W_dec=W, codes=codes, step=step, total_steps=total,
                          generator=torch.Generator().manual_seed(seed * 1_000_003 + step))


def assert_no_grad_to_vals(val: torch.Tensor, codes: SparseCodes) -> None:
    """The penalties depend on the codes only through which latents fire (never differentiably)."""
    (g,) = torch.autograd.grad(val, codes.vals, retain_graph=True, allow_unused=True)
    assert g is None or float(g.abs().max()) == 0.0


# -- registry -------------------------------------------------------------------------------------
def test_registry_lists_and_builds_all_six() -> None:
    names = variant_names()
    for v in VARIANTS:
        assert v in names
        p = build_penalty(v, 32, 8, {})
        assert p.name == v
    cfg = make_config("topk_pairs", {"rho": "0.002", "tau_mode": "adaptive", "tau": "0.2"})
    assert cfg.rho == 0.002 and cfg.tau_mode == "adaptive" and cfg.tau == 0.2
    assert make_config("temporal", {"sample_pairs": "0"}).sample_pairs == 0
    assert make_config("adaptive", {"refresh_every": "7"}).refresh_every == 7
    p = build_penalty("progressive", 32, 8, {"lambda2_max": "0.5"})
    assert p.config.lambda2_max == 0.5
    with pytest.raises(ValueError, match="no parameter"):
        make_config("ortsae", {"nope": 1})


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rho", (0.01, 0.5))
def test_topk_pairs_matches_reference(act: str, rho: float) -> None:
    F = 48
    W = unit_rows(F, 12, shared=0.7)
    codes = make_codes(act, F)
    p = build_penalty("topk_pairs", F, 12, {"rho": rho, "tau": 0.1, "lambda_": 2.0})
    val, logs = p(ctx_for(W, codes))
    want, keys = ref.topk_pairs(W, codes, rho, 0.1, 2.0)
    assert_close_val_grad(val, want, W)
    assert_no_grad_to_vals(val, codes)
    assert torch.equal(p.last_keys, keys)
    n_cofire = cofiring_pairs(codes, F).n_pairs
    expect = min(math.ceil(rho * F * (F - 1) / 2), n_cofire)
    assert logs["pairs"] == expect == keys.numel()
    if rho == 0.01:  # enough co-firing pairs: exactly ceil(ρ·F(F−1)/2) kept
        assert n_cofire > n_keep(F, rho) and keys.numel() == n_keep(F, rho) == math.ceil(0.01 * 48 * 47 / 2)
    i, j = keys // F, keys % F
    assert bool((i < j).all()) and keys.unique().numel() == keys.numel()
    assert logs["tau"] == pytest.approx(0.1) and logs["penalty"] == pytest.approx(float(want.detach()))


def test_topk_pairs_adaptive_tau_stays_in_bounds() -> None:
    F = 48
    codes = make_codes("topk", F)
    high = unit_rows(F, 12, shared=5.0)  # nearly parallel rows: mean+std of |cos| ≈ 1 → clamps at 0.3
    low = torch.eye(F, 64)[:, :64].clone().requires_grad_(True)  # orthogonal rows: |cos| = 0 → 0.05
    for W, bound in ((high, 0.3), (low, 0.05)):
        p = build_penalty("topk_pairs", F, W.shape[1], {"tau_mode": "adaptive", "tau_ema": 0.5, "rho": 0.05})
        taus = []
        for step in range(30):
            _, logs = p(ctx_for(W, codes, step))
            taus.append(logs["tau"])
            assert 0.05 <= float(p.tau) <= 0.3
        assert taus[0] == pytest.approx(0.1)  # the step uses τ before its update
        assert float(p.tau) == pytest.approx(bound)


def test_jaccard_on_known_sets_and_consecutive_logging() -> None:
    a, b = torch.tensor([1, 2, 3, 4]), torch.tensor([3, 4, 5])
    assert jaccard(a, b) == pytest.approx(2 / 5) == ref.jaccard({1, 2, 3, 4}, {3, 4, 5})
    assert jaccard(a, a) == 1.0 and jaccard(a, torch.tensor([9])) == 0.0
    assert jaccard(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 1.0
    F = 48
    W = unit_rows(F, 12)
    p = build_penalty("topk_pairs", F, 12, {"rho": 0.02})
    p(ctx_for(W, make_codes("topk", F, seed=1)))
    first = set(p.last_keys.tolist())
    assert "jaccard" not in p.diagnostics(W)  # nothing logged before
    p(ctx_for(W, make_codes("topk", F, seed=2), step=1))  # an unlogged step in between
    p(ctx_for(W, make_codes("topk", F, seed=3), step=2))
    third = set(p.last_keys.tolist())
    d = p.diagnostics(W)
    assert d["jaccard"] == pytest.approx(ref.jaccard(first, third))
    assert p.diagnostics(W)["jaccard"] == 1.0  # same set at two consecutive logging steps


# -- progressive ----------------------------------------------------------------------------------
def test_progressive_schedule_values() -> None:
    assert lambda2(0.0, 0.1) == pytest.approx(0.1)
    assert lambda2(0.5, 0.1) == pytest.approx(0.025)
    assert lambda2(1.0, 0.1) == 0.0
    assert threshold(0.0, 0.1, 1e-3) == pytest.approx(0.1)
    assert threshold(0.5, 0.1, 1e-3) == pytest.approx(0.05)
    assert threshold(1.0, 0.1, 1e-3) == pytest.approx(1e-3)  # ε floor: no division by zero
    F = 48
    W = unit_rows(F, 12)
    p = build_penalty("progressive", F, 12, {})
    for step, (lam, thr) in ((0, (0.1, 0.1)), (50, (0.025, 0.05)), (100, (0.0, 1e-3))):
        val, logs = p(ctx_for(W, make_codes("topk", F), step=step, total=100))
        assert logs["lambda2"] == pytest.approx(lam) and logs["thr"] == pytest.approx(thr)
        assert logs["weight"] == logs["lambda2"] and math.isfinite(float(val.detach()))
    assert float(val.detach()) == 0.0
    with pytest.raises(ValueError):
        build_penalty("progressive", F, 12, {"eps": 0.0})


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("step", (0, 50, 90))
def test_progressive_matches_reference(act: str, step: int) -> None:
    F = 48
    W = unit_rows(F, 12, shared=0.5)
    codes = make_codes(act, F, B=128, freq_bias=2.5)
    p = build_penalty("progressive", F, 12, {"lambda2_max": 0.3, "base_threshold": 0.1, "eps": 1e-3})
    val, logs = p(ctx_for(W, codes, step=step, total=100))
    want = ref.progressive(W, codes, step / 100, 0.3, 0.1, 1e-3)
    assert logs["pairs"] > 0  # some pairs pass the threshold
    assert_close_val_grad(val, want, W)
    assert_no_grad_to_vals(val, codes)


# -- adaptive -------------------------------------------------------------------------------------
def planted_groups(F: int) -> torch.Tensor:
    g = torch.arange(F)
    g[1:4] = 0      # {0, 1, 2, 3}
    g[10:13] = 10   # {10, 11, 12}
    return g


@pytest.mark.parametrize("act", ACTS)
def test_adaptive_is_the_full_pair_sum_when_exact(act: str) -> None:
    """chunk_size ≥ F and all co-firing pairs: the estimate equals λ/N · Σ_{i<j} h_ij exactly."""
    F = 48
    W = unit_rows(F, 12, shared=0.6)
    codes = make_codes(act, F)
    p = build_penalty("adaptive", F, 12, {"alpha": 0.2, "lambda_": 3.0, "chunk_size": 1000, "cofire_samples": 0})
    p.group.copy_(planted_groups(F))
    val, logs = p(ctx_for(W, codes, step=7))  # not a refresh step: the planted groups are used
    want = 3.0 * ref.adaptive_sum(W, planted_groups(F), 0.2) / (F * (F - 1) / 2)
    assert_close_val_grad(val, want, W)
    assert_no_grad_to_vals(val, codes)
    assert logs["refreshed"] == 0.0 and 0 < logs["same_group_frac"] < 1


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("samples", (0, 40))
def test_adaptive_estimate_and_gradient_are_unbiased(act: str, samples: int) -> None:
    """Random 12-latent chunks (and sampled co-firing pairs): the mean over 3 000 seeds of the value
    and of the gradient match the dense float64 Σ (each pair weighted once, co-firing or not)."""
    F, n = 48, 3000
    W = unit_rows(F, 12, shared=0.6)
    codes = make_codes(act, F)
    assert cofiring_pairs(codes, F).n_pairs > samples
    p = build_penalty("adaptive", F, 12, {"alpha": 0.2, "lambda_": 1.0, "chunk_size": 12, "cofire_samples": samples})
    p.group.copy_(planted_groups(F))
    vals, grad = [], torch.zeros_like(W)
    for seed in range(n):
        ctx = PenaltyContext(W_dec=W, codes=codes, step=1, total_steps=10**6,
                             generator=torch.Generator().manual_seed(seed))
        v, _ = p(ctx)
        vals.append(float(v.detach()))
        grad += grads(v, W)
    want = ref.adaptive_sum(W, planted_groups(F), 0.2) / (F * (F - 1) / 2)
    (want_grad,) = torch.autograd.grad(want, W)
    mean, se = float(np.mean(vals)), float(np.std(vals) / np.sqrt(n))
    want_v = float(want.detach())
    assert abs(mean - want_v) < 4 * se + 1e-9, (mean, want_v, se)
    g = (grad / n).double()
    cos = torch.nn.functional.cosine_similarity(g.flatten(), want_grad.double().flatten(), dim=0)
    assert float(cos) > 0.99 and abs(float(g.norm() / want_grad.norm()) - 1) < 0.05


def test_adaptive_refreshes_every_G_after_a_warm_up() -> None:
    F, G = 48, 5
    W = unit_rows(F, 12)
    p = build_penalty("adaptive", F, 12, {"refresh_every": G, "min_coactivation": 0.05, "max_group_size": 6})
    prev = p.group.clone()
    for step in range(3 * G + 2):
        _, logs = p(ctx_for(W, make_codes("topk", F, B=32, seed=step), step=step, total=100))
        refreshed = step > 0 and step % G == 0
        assert logs["refreshed"] == float(refreshed) and logs["refresh_period"] == G
        assert int(p.n_refreshes) == step // G
        assert int(p.last_refresh_step) == (step - step % G if step >= G else -1)
        if not refreshed:
            assert torch.equal(p.group, prev)  # frozen between refreshes (singletons during the warm-up)
            assert int(p.acc_tokens) == 32 * (step % G + (1 if step < G else 0))
        else:
            assert int(p.acc_tokens) == 0
        prev = p.group.clone()
    assert int((torch.bincount(p.group, minlength=F) > 1).sum()) > 0  # some groups formed
    assert int(torch.bincount(p.group, minlength=F).max()) <= 6
    # short runs refresh at least ten times: G' = min(G, total_steps // 10)
    q = build_penalty("adaptive", F, 12, {"refresh_every": 100})
    assert q.refresh_period(150) == 15 and q.refresh_period(5) == 1 and q.refresh_period(10**6) == 100


def test_greedy_groups_find_planted_cofiring_sets() -> None:
    F = 20
    idx = torch.tensor([[0, 1, 2], [3, 4, 9], [0, 1, 2], [3, 4, 15], [0, 2, 7], [5, 6, 8]] * 10)
    codes = SparseCodes(torch.ones(idx.shape), idx)
    cof = cofiring_pairs(codes, F)
    g = greedy_groups(F, cof.keys, cof.counts, min_count=15, max_size=8)
    assert g[:3].tolist() == [0, 0, 0] and g[3:5].tolist() == [3, 3]
    assert torch.equal(g[5:], torch.arange(5, F))  # weakly co-firing latents stay alone
    capped = greedy_groups(F, cof.keys, cof.counts, min_count=15, max_size=2)
    assert int(torch.bincount(capped).max()) == 2


def test_group_condition_numbers_match_numpy() -> None:
    np = pytest.importorskip("numpy")
    F, d = 40, 10
    W = unit_rows(F, d, seed=4).detach()
    group = torch.arange(F)
    group[[1, 2, 3]] = 0
    group[[6, 7]] = 5
    group[20:30] = 20
    ids, sizes, kappa = group_condition_numbers(W, group)
    assert ids.tolist() == [0, 5, 20] and sizes.tolist() == [4, 3, 10]
    for gid, k in zip(ids.tolist(), kappa.tolist(), strict=True):
        sub = W[group == gid].double().numpy()
        assert k == pytest.approx(np.linalg.cond(sub), rel=1e-9)
        s = np.linalg.svd(sub, compute_uv=False)
        assert k == pytest.approx(s[0] / s[-1], rel=1e-9)
    p = build_penalty("adaptive", F, d, {})
    p.group.copy_(group)
    diag = p.diagnostics(W)
    assert diag["n_groups"] == 3 and diag["kappa_max"] == pytest.approx(float(kappa.max()))


# -- static_ortho / ortsae ------------------------------------------------------------------------
def test_static_ortho_matches_reference() -> None:
    F = 40
    W = unit_rows(F, 12, shared=0.4)
    codes = make_codes("topk", F)
    exact = build_penalty("static_ortho", F, 12, {"lambda_": 3.0, "chunk_size": 64, "chunks_per_step": 0})
    val, _ = exact(ctx_for(W, codes))
    assert_close_val_grad(val, ref.static_ortho_exact(W, 3.0), W)
    for per_step in (0, 2):  # chunked: the same random chunks as the implementation
        cfg = {"lambda_": 3.0, "chunk_size": 12, "chunks_per_step": per_step}
        p = build_penalty("static_ortho", F, 12, cfg)
        val, logs = p(ctx_for(W, codes, step=5))
        chunks = random_chunks(F, 12, per_step, torch.Generator().manual_seed(5))
        assert chunks.shape[0] == (2 if per_step else 4)
        assert_close_val_grad(val, ref.static_ortho_chunked(W, 3.0, chunks), W)


def test_static_ortho_chunk_estimate_is_unbiased() -> None:
    F = 30
    W = unit_rows(F, 8, shared=0.5)
    p = build_penalty("static_ortho", F, 8, {"lambda_": 1.0, "chunk_size": 7, "chunks_per_step": 1})
    est = torch.stack([p(ctx_for(W, make_codes("topk", F), step=s))[0].detach() for s in range(600)])
    want = ref.static_ortho_exact(W, 1.0).detach()
    torch.testing.assert_close(est.mean().double(), want, rtol=0.05, atol=0)


@pytest.mark.parametrize("chunk", (1000, 9))
def test_ortsae_matches_reference(chunk: int) -> None:
    F = 40
    W = unit_rows(F, 12, shared=0.4)
    codes = make_codes("relu", F)
    p = build_penalty("ortsae", F, 12, {"lambda_": 2.0, "chunk_size": chunk, "search_dtype": "float32"})
    val, logs = p(ctx_for(W, codes, step=3))
    chunks = random_chunks(F, chunk, 0, torch.Generator().manual_seed(3))
    assert_close_val_grad(val, ref.ortsae(W, 2.0, chunks), W)
    assert_no_grad_to_vals(val, codes)
    expect = F if chunk >= F else F - (F % chunk == 1)
    assert logs["pairs"] == expect


def test_ortsae_bf16_partner_search_is_within_rounding_of_the_max() -> None:
    F, chunk = 300, 100
    W = unit_rows(F, 12, shared=0.4)
    chunks = random_chunks(F, chunk, 0, torch.Generator().manual_seed(5))
    i32, j32 = chunk_partners(W, chunks, torch.float32)
    i16, j16 = chunk_partners(W, chunks, torch.bfloat16)
    assert torch.equal(i32, i16)  # same latents, partners may differ only at near-ties
    best = (W[i32] * W[j32]).sum(1).square()
    got = (W[i16] * W[j16]).sum(1).square()
    assert (got >= best * 0.98).all() and (got <= best + 1e-6).all()
    assert (j16 == j32).float().mean() > 0.8
    p = build_penalty("ortsae", F, 12, {"chunk_size": chunk, "search_dtype": "bfloat16"})
    val = p(ctx_for(W, make_codes("relu", F), step=5))[0]
    torch.testing.assert_close(val.double(), ref.ortsae(W, 1.0, chunks).double(), rtol=0.02, atol=0)
    with pytest.raises(ValueError, match="search_dtype"):
        build_penalty("ortsae", F, 12, {"search_dtype": "int8"})


# -- temporal -------------------------------------------------------------------------------------
def token_stream(n: int = 4096, F: int = 64, k: int = 4, seed: int = 0) -> SparseCodes:
    """Synthetic TopK codes whose co-firing pattern drifts along the stream."""
    g = torch.Generator().manual_seed(seed)
    drift = torch.linspace(0, 1, n)[:, None] * torch.linspace(-2, 2, F)[None, :]
    pre = torch.randn(n, F, generator=g) + torch.linspace(1.5, -1.5, F) + drift
    vals, idx = pre.topk(k, dim=-1)
    return SparseCodes(torch.relu(vals), idx)


def feed(p: torch.nn.Module, stream: SparseCodes, batch: int, W: torch.Tensor) -> list[float]:
    out = []
    for s in range(0, stream.idx.shape[0], batch):
        sub = SparseCodes(stream.vals[s:s + batch], stream.idx[s:s + batch])
        val, _ = p(ctx_for(W, sub, step=s // batch))
        out.append(float(val.detach()))
    return out


def dense_from(keys: torch.Tensor, vals: torch.Tensor, F: int) -> torch.Tensor:
    out = torch.zeros(F * F, dtype=torch.float64)
    out[keys] = vals.double()
    return out.view(F, F)


def test_temporal_state_is_batch_size_invariant() -> None:
    F = 64
    W = unit_rows(F, 8)
    stream = token_stream(4096, F)
    states = []
    for batch in (512, 2048):
        p = build_penalty("temporal", F, 8, {"window_tokens": 1000, "sample_pairs": 0})
        feed(p, stream, batch, W)
        states.append(p.state_dict())
    a, b = states
    assert a.keys() == b.keys()
    assert int(a["n_windows"]) == 4 and int(a["win_tokens"]) == 96
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_temporal_matches_dense_tracker_and_stores_upper_triangle_only() -> None:
    F = 64
    W = unit_rows(F, 8, shared=0.5)
    stream = token_stream(2500, F)
    cfg = {"window_tokens": 600, "sample_pairs": 0, "lambda_": 0.5, "alpha_base": 0.1, "count_scale": 20.0,
           "prune_below": 0.0}
    p = build_penalty("temporal", F, 8, cfg)
    tracker = ref.DenseTemporalTracker(F, 600, 0.1, 20.0, 1e-8)
    for s in range(0, 2500, 256):
        sub = SparseCodes(stream.vals[s:s + 256], stream.idx[s:s + 256])
        val, _ = p(ctx_for(W, sub, step=s // 256))
        tracker.feed(sub)
        if tracker.windows:
            assert_close_val_grad(val, tracker.penalty(W, 0.5), W)
    assert tracker.windows == int(p.n_windows) == 4
    for keys in (p.avg_keys, p.last_keys, p.win_keys):
        i, j = keys // F, keys % F
        assert bool((i < j).all()) and bool((keys[1:] > keys[:-1]).all())  # i<j, sorted, unique
    torch.testing.assert_close(dense_from(p.avg_keys, p.avg_vals, F), tracker.cbar, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dense_from(p.last_keys, p.last_c, F), tracker.c, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dense_from(p.last_keys, p.last_w, F), tracker.w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dense_from(p.win_keys, p.win_counts, F), tracker.count)
    assert int(p.win_tokens) == tracker.tokens


def test_temporal_alpha_and_stability_weights() -> None:
    F = 8
    W = unit_rows(F, 4)
    p = build_penalty("temporal", F, 4, {"window_tokens": 100, "sample_pairs": 0, "count_scale": 1000.0})
    # window 1: pair (0,1) on 50 tokens, pair (2,3) on all 100 tokens
    idx = torch.tensor([[0, 1, 2, 3]] * 50 + [[2, 3, 4, 5]] * 50)
    vals = torch.ones(100, 4)
    vals[50:, 2:] = 0  # (4,5) inactive: zero-padded slots
    p(ctx_for(W, SparseCodes(vals, idx)))
    keys = {int(k): n for n, k in enumerate(p.avg_keys)}
    a01, a23 = keys[0 * F + 1], keys[2 * F + 3]
    assert float(p.avg_vals[a01]) == pytest.approx(0.05 * 0.5)  # α = min(0.1, 50/1000) = 0.05
    assert float(p.avg_vals[a23]) == pytest.approx(0.1 * 1.0)  # α = min(0.1, 100/1000) = 0.1
    assert 4 * F + 5 not in keys
    lk = {int(k): n for n, k in enumerate(p.last_keys)}
    # w = c(1 + |c − c̄|/max(c, c̄)) with the updated c̄: new pairs are maximally unstable
    assert float(p.last_w[lk[1]]) == pytest.approx(0.5 * (1 + 0.475 / 0.5))
    assert float(p.last_w[lk[2 * F + 3]]) == pytest.approx(1.0 * (1 + 0.9))
    # window 2: the pattern changes — (0,1) stops, (6,7) appears; (2,3) continues
    idx2 = torch.tensor([[2, 3, 6, 7]] * 100)
    p(ctx_for(W, SparseCodes(torch.ones(100, 4), idx2), step=1))
    keys = {int(k): n for n, k in enumerate(p.avg_keys)}
    assert float(p.avg_vals[keys[1]]) == pytest.approx(0.025)  # absent pair: α = 0, unchanged
    assert float(p.avg_vals[keys[2 * F + 3]]) == pytest.approx(0.9 * 0.1 + 0.1 * 1.0)
    lk = {int(k): n for n, k in enumerate(p.last_keys)}
    assert 1 not in lk  # weights only for the last window's pairs
    w_new, c_new = float(p.last_w[lk[6 * F + 7]]), float(p.last_c[lk[6 * F + 7]])
    assert w_new > c_new and w_new == pytest.approx(1.0 * (1 + 0.9))
    stable = float(p.last_w[lk[2 * F + 3]])
    assert 1.0 < stable < w_new  # a continuing pair is less unstable than a new one


def test_temporal_no_penalty_before_first_window_then_sampling_is_unbiased() -> None:
    F = 64
    W = unit_rows(F, 8, shared=0.5)
    stream = token_stream(1200, F)
    p = build_penalty("temporal", F, 8, {"window_tokens": 1000, "sample_pairs": 0})
    val, logs = p(ctx_for(W, SparseCodes(stream.vals[:500], stream.idx[:500])))
    assert float(val.detach()) == 0.0 and logs["pairs"] == 0.0
    p(ctx_for(W, SparseCodes(stream.vals[500:], stream.idx[500:]), step=1))
    exact, _ = p(ctx_for(W, SparseCodes(stream.vals[:0], stream.idx[:0]), step=2))
    P = int(p.last_keys.numel())
    sampled = build_penalty("temporal", F, 8, {"window_tokens": 1000, "sample_pairs": P // 4})
    sampled.load_state_dict(p.state_dict())
    empty = SparseCodes(stream.vals[:0], stream.idx[:0])
    est = torch.stack([sampled(ctx_for(W, empty, step=s))[0].detach() for s in range(150)])
    torch.testing.assert_close(est.mean(), exact.detach(), rtol=0.03, atol=0)
    again = sampled(ctx_for(W, empty, step=7))[0]
    assert float(again.detach()) == float(est[7])  # deterministic given the step generator


def test_temporal_window_summary_is_rebuilt_after_loading_state() -> None:
    F = 64
    W = unit_rows(F, 8, shared=0.5)
    stream = token_stream(1000, F)
    perm = torch.randperm(F, generator=torch.Generator().manual_seed(1))
    cfg = {"window_tokens": 1000, "sample_pairs": 16}
    a, b = build_penalty("temporal", F, 8, cfg), build_penalty("temporal", F, 8, cfg)
    a(ctx_for(W, stream))
    b(ctx_for(W, SparseCodes(stream.vals, perm[stream.idx])))  # same pair count, other pairs
    assert int(a.n_windows) == int(b.n_windows) == 1 and a.last_keys.numel() == b.last_keys.numel()
    empty = SparseCodes(stream.vals[:0], stream.idx[:0])
    b(ctx_for(W, empty, step=3))  # b caches its own window summary
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(ctx_for(W, empty, step=5))[0], a(ctx_for(W, empty, step=5))[0], rtol=0, atol=0)


# -- state round trip -----------------------------------------------------------------------------
PARAMS = {
    "topk_pairs": {"tau_mode": "adaptive", "rho": 0.05},
    "adaptive": {"refresh_every": 3, "min_coactivation": 0.05, "chunk_size": 16},
    "progressive": {},
    "temporal": {"window_tokens": 150, "sample_pairs": 50},
    "static_ortho": {"chunk_size": 16, "chunks_per_step": 2},
    "ortsae": {"chunk_size": 16},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip_gives_identical_continuation(variant: str) -> None:
    F = 48
    W = unit_rows(F, 12, shared=0.5)
    batches = [make_codes("topk" if s % 2 else "relu", F, B=64, seed=s) for s in range(10)]
    p = build_penalty(variant, F, 12, PARAMS[variant])
    for s in range(5):
        p(ctx_for(W, batches[s], step=s, total=10))
    if variant == "topk_pairs":
        p.diagnostics(W)
    saved = copy.deepcopy(p.state_dict())
    fresh = build_penalty(variant, F, 12, PARAMS[variant])
    fresh.load_state_dict(saved)
    for s in range(5, 10):
        a, la = p(ctx_for(W, batches[s], step=s, total=10))
        b, lb = fresh(ctx_for(W, batches[s], step=s, total=10))
        assert float(a.detach()) == float(b.detach()) and la == lb
        assert torch.equal(grads(a, W), grads(b, W))
        assert p.diagnostics(W.detach()) == fresh.diagnostics(W.detach())
    for (ka, va), (kb, vb) in zip(p.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logs_are_scalars_with_required_keys(variant: str) -> None:
    F = 48
    W = unit_rows(F, 12)
    p = build_penalty(variant, F, 12, PARAMS[variant])
    _, logs = p(ctx_for(W, make_codes("topk", F, B=200), step=0, total=10))
    assert {"penalty", "weight", "pairs"} <= logs.keys()
    # floats, or 0-d tensors that the trainer reads back at log steps only (no per-step host sync)
    assert all(isinstance(v, float) or (isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad)
               for v in logs.values())
    if variant == "progressive":
        assert {"lambda2", "thr"} <= logs.keys()
    if variant == "topk_pairs":
        assert "tau" in logs


def test_topk_pairs_ties_at_the_cut_prefer_smaller_keys() -> None:
    F = 10
    idx = torch.tensor([[0, 1, 2, 3]] * 3 + [[4, 5, 6, 7]] * 3)
    codes = SparseCodes(torch.ones(6, 4), idx)  # 12 pairs, all with s_ij = 3
    W = unit_rows(F, 6)
    p = build_penalty("topk_pairs", F, 6, {"rho": 5 / 45})
    p(ctx_for(W, codes))
    _, want = ref.topk_pairs(W, codes, 5 / 45, 0.1, 1.0)
    assert p.last_keys.tolist() == want.tolist() == [1, 2, 3, 12, 13]
