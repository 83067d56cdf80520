"""The sparse co-firing pair engine shared by the pair penalties (``topk_pairs``, ``adaptive``,
``progressive``, ``temporal``, ``ortsae``). It is not a variant: variants import it, never each other.

* :func:`cofiring_pairs` turns ``SparseCodes`` (``vals``/``idx`` ``[B, K]``) into the sorted unique
  pairs ``i < j`` that fire together in at least one token, keyed ``i·F + j`` (int64), with their
  token counts and optional scores. Time and memory ``O(B·K²)``, independent of ``F``.
* :func:`pair_penalty` computes ``Σ_p w_p · max(0, |cos_p| − τ_p)^q`` for a list of pairs as a
  sampled dense-dense product (``torch.sparse.sampled_addmm`` on the CSR pattern of the pairs) with
  a sparse-dense backward (``(S + Sᵀ)·W``): ``O(P·d)`` time, ``O(P)`` extra memory.
* :func:`token_pair_penalty` computes the same sum through each token's ``K×K`` Gram matrix of its
  active decoder rows (batched matmul, ``O(B·K²·d)``, one ``[chunk, K, d]`` gather at a time),
  spreading each pair's weight over its occurrences — cheaper when most co-firing pairs are used.
  :func:`cofiring_penalty` picks the cheaper of the two.
* sorted-key utilities (:func:`pair_keys`, :func:`merge_sparse`,
  :func:`jaccard`) and :class:`SparseStatePenalty`, a penalty base whose sparse buffers change size.

No function here forms an ``F×F`` matrix. Tested against dense references in ``tests/test_pairs.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...rundir.sae import SparseCodes
from .base import Penalty

TOKEN_CHUNK = 256      # tokens per chunk in token_pair_penalty (bounds the [chunk, K, d] gathers)
TOKEN_PATH_FRACTION = 0.3  # cofiring_penalty uses the token path when > 30 % of occurrences are used
TOKEN_GRID_MAX = 1 << 26   # ... and its B·K² slot grid is at most this big (variable-count codes can be wide)


def pair_keys(i: Tensor, j: Tensor, d_sae: int) -> Tensor:
    """int64 key ``min(i,j)·F + max(i,j)`` of unordered pairs (same shape as ``i``)."""
    return torch.minimum(i, j).long() * d_sae + torch.maximum(i, j).long()


def sort_with_perm(keys: Tensor, runs: bool = False) -> tuple[Tensor, Tensor]:
    """``(sorted keys, perm)`` of an int64 vector, equal to ``torch.sort(keys, stable=True)``.

    On CPU the position is packed into the low bits of non-negative keys so NumPy's (SIMD) sort of
    plain integers replaces an argsort (several times faster); elsewhere ``torch.sort``. ``runs``:
    the input is a concatenation of a few sorted runs (NumPy's stable sort then merges them in
    linear time; 1.5× faster than the SIMD quicksort for two runs).
    """
    n = keys.numel()
    if n and keys.device.type == "cpu":
        nbits = max(n - 1, 1).bit_length()
        if int(keys.min()) >= 0 and int(keys.max()).bit_length() + nbits <= 62:
            packed = (keys.long() << nbits) | torch.arange(n, dtype=torch.long)
            s = torch.from_numpy(np.sort(packed.numpy(), kind="stable" if runs else "quicksort"))
            return s >> nbits, s & ((1 << nbits) - 1)
    return torch.sort(keys.long(), stable=True)


@dataclass
class Groups:
    """Equal values of a sorted key vector: ``keys [U]`` unique, ``perm [n]`` sorting permutation of
    the input, ``grp [n]`` unique index of each *sorted* position (non-decreasing), ``starts [U]``
    first sorted position of each key, ``counts [U]`` multiplicities."""

    keys: Tensor
    perm: Tensor
    grp: Tensor
    starts: Tensor
    counts: Tensor

    def inverse(self) -> Tensor:
        """``[n]`` unique index of each *input* position (``keys[inverse] == input``)."""
        inv = torch.empty_like(self.perm)
        inv[self.perm] = self.grp
        return inv


def group_keys(keys: Tensor, runs: bool = False) -> Groups:
    """Group an int64 vector by value (stable order within a value); ``runs``: see :func:`sort_with_perm`."""
    sk, perm = sort_with_perm(keys, runs)
    n = sk.numel()
    new = torch.ones(n, dtype=torch.bool, device=sk.device)
    if n > 1:
        new[1:] = sk[1:] != sk[:-1]
    starts = new.nonzero().squeeze(1)
    grp = torch.cumsum(new, 0) - 1
    counts = torch.diff(starts, append=torch.tensor([n], device=sk.device))
    return Groups(sk[starts], perm, grp, starts, counts)



def merge_sparse(keys_a: Tensor, vals_a: Tensor, keys_b: Tensor, vals_b: Tensor,
                 b_sorted: bool = True) -> tuple[Tensor, Tensor]:
    """Sum two sparse vectors given as (int64 keys, values); returns sorted unique keys and sums.

    ``keys_a`` is sorted unique; ``keys_b`` too when ``b_sorted``, else any order with repeats."""
    g = group_keys(torch.cat([keys_a, keys_b]), runs=b_sorted)
    vals = torch.cat([vals_a, vals_b.to(vals_a.dtype)])[g.perm]
    out = torch.zeros(g.keys.numel(), dtype=vals_a.dtype, device=vals_a.device)
    return g.keys, out.index_add_(0, g.grp, vals)


@dataclass
class CoFiring:
    """The unique co-firing pairs of one batch of sparse codes.

    Occurrences live on the ``[B, K, K]`` slot grid of ``idx`` (each row sorted ascending, so slot
    ``a < b`` holds latents ``idx[b, a] < idx[b, b']``); a grid position is ``b·K² + a·K + b'``.

    Attributes:
        d_sae: F. n_tokens: B. K: slots per code row.
        idx: ``[B, K]`` latent indices, each row sorted ascending (the grid's slot order).
        keys: ``[P]`` sorted unique int64 keys ``i·F + j`` (``i < j``) of the pairs active together
            in at least one token ("active" = ``f > 0``).
        counts: ``[P]`` int64, tokens in which both fire.
        scores: ``[P]`` float32, ``s_ij = Σ_b f_bi f_bj`` (detached), when requested.
        occ_pos: ``[n_occ]`` grid positions of the active occurrences, grouped by pair (key order).
        grp: ``[n_occ]`` pair index of each entry of ``occ_pos`` (non-decreasing).
        first_pos: ``[P]`` grid position of each pair's first occurrence.
    """

    d_sae: int
    n_tokens: int
    K: int
    idx: Tensor
    keys: Tensor
    counts: Tensor
    scores: Tensor | None
    occ_pos: Tensor
    grp: Tensor
    first_pos: Tensor

    @property
    def n_pairs(self) -> int:
        return int(self.keys.numel())

    @property
    def n_occ(self) -> int:
        return int(self.occ_pos.numel())

    @property
    def i(self) -> Tensor:
        return self.keys // self.d_sae

    @property
    def j(self) -> Tensor:
        return self.keys % self.d_sae


def _active_first(codes: SparseCodes, d_sae: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of ``codes`` with the active slots first, in ascending latent order, then the inactive
    ones; trimmed to the largest active count. Returns ``(idx, vals, act)`` ``[B, K']``."""
    vals, idx = codes.vals.detach(), codes.idx
    act = vals > 0
    order = torch.where(act, idx, idx + d_sae).argsort(dim=1)
    idx, vals, act = idx.gather(1, order), vals.gather(1, order), act.gather(1, order)
    K = max(int(act.sum(1).max()), 1) if act.numel() else 1
    return idx[:, :K], vals[:, :K], act[:, :K]


def _row_buckets(act: Tensor) -> list[tuple[Tensor, int]] | None:
    """Rows grouped by the next power of two ≥ their active count, as ``[(rows, width)]``, when
    that makes the slot-pair grids at least 4× smaller than one ``B×K×K`` grid; else None.
    (Variable-count codes: BatchTopK gives rare tokens hundreds of latents.)"""
    B, K = act.shape
    counts = act.sum(1)
    width = torch.where(counts > 1, 2 ** torch.ceil(torch.log2(counts.clamp_min(1).double())).long(),
                        torch.ones_like(counts)).clamp_max(K)
    if 4 * int((width * width).sum()) >= B * K * K:
        return None
    return [((width == w).nonzero().squeeze(1), int(w)) for w in torch.unique(width).tolist()]


def _occurrence_positions(idx: Tensor, act: Tensor) -> Tensor:
    """Grid positions ``b·K² + a·K + a'`` (``a < a'``, both active, different latents), ascending."""
    B, K = idx.shape
    buckets = _row_buckets(act)
    if buckets is None:
        upper = torch.ones(K, K, dtype=torch.bool, device=idx.device).triu(1)
        m = act[:, :, None] & act[:, None, :] & upper & (idx[:, :, None] != idx[:, None, :])
        return m.reshape(-1).nonzero().squeeze(1)
    parts = []
    for rows, w in buckets:
        si, sa = idx[rows, :w], act[rows, :w]
        upper = torch.ones(w, w, dtype=torch.bool, device=idx.device).triu(1)
        m = sa[:, :, None] & sa[:, None, :] & upper & (si[:, :, None] != si[:, None, :])
        rb, a, a2 = m.nonzero(as_tuple=True)
        parts.append(rows[rb] * (K * K) + a * K + a2)
    return torch.cat(parts).sort().values


def occurrence_keys(codes: SparseCodes, d_sae: int) -> Tensor:
    """Keys ``i·F + j`` (``i < j``) of every (token, pair) occurrence in which both latents fire:
    ``[n_occ]`` int64, unsorted, with repeats (``n_occ ≤ B·K(K−1)/2``). The same multiset as the
    occurrences :func:`cofiring_pairs` groups, without grouping them."""
    vals, idx = codes.vals.detach(), codes.idx
    K = idx.shape[1]
    if codes.live is not None or not bool((vals > 0).all()):  # variable counts: bounded grids
        idx, _, act = _active_first(codes, d_sae)
        pos = _occurrence_positions(idx, act)
        K = idx.shape[1]
        flat = idx.reshape(-1)
        b, r = pos // (K * K), pos % (K * K)
        return flat[b * K + r // K] * d_sae + flat[b * K + r % K]
    idx, order = idx.sort(dim=1)
    act = vals.gather(1, order) > 0
    a, b = torch.triu_indices(K, K, 1, device=idx.device)
    ia, ib = idx[:, a], idx[:, b]
    keys = ia * d_sae + ib
    ok = act[:, a] & act[:, b] & (ia != ib)
    return keys.reshape(-1) if bool(ok.all()) else keys[ok]


def cofiring_pairs(codes: SparseCodes, d_sae: int, with_scores: bool = False) -> CoFiring:
    """Unique co-firing pairs of ``codes`` (``vals``/``idx`` ``[B, K]``; ``vals == 0`` = inactive slot).

    Forms the ``B·K(K−1)/2`` per-token slot pairs ``a < b`` of the row-sorted indices, keeps those
    whose two slots are active and name different latents, and groups them by key ``i·F + j``.
    Time and memory ``O(B·K²)``; for variable-count codes the rows are first compacted (active
    slots first) and enumerated in buckets of similar count, ``O(Σ_b count_b²)``.
    """
    vals, idx = codes.vals.detach(), codes.idx
    B, K = idx.shape
    dev = idx.device
    act = vals > 0
    if codes.live is not None or not bool(act.all()):
        idx, vals, act = _active_first(codes, d_sae)
        K = idx.shape[1]
        occ_pos = _occurrence_positions(idx, act)
    else:
        idx, order = idx.sort(dim=1)
        vals = vals.gather(1, order)
        upper = torch.ones(K, K, dtype=torch.bool, device=dev).triu(1)
        same = idx[:, 1:] == idx[:, :-1]
        if not bool(same.any()):  # TopK fast path: every slot pair is an occurrence
            tri = upper.reshape(-1).nonzero().squeeze(1)
            occ_pos = (torch.arange(B, device=dev)[:, None] * (K * K) + tri).reshape(-1)
        else:
            occ_pos = _occurrence_positions(idx, act)
    flat = idx.reshape(-1)
    b, r = occ_pos // (K * K), occ_pos % (K * K)
    ia, ib = b * K + r // K, b * K + r % K
    g = group_keys(flat[ia] * d_sae + flat[ib])
    occ_pos = occ_pos[g.perm]
    scores = None
    if with_scores:
        fv = vals.reshape(-1)
        prod = (fv[ia] * fv[ib])[g.perm].float()
        scores = torch.zeros(g.keys.numel(), dtype=torch.float32, device=dev).index_add_(0, g.grp, prod)
    return CoFiring(d_sae, B, K, idx, g.keys, g.counts, scores, occ_pos, g.grp, occ_pos[g.starts])


def _hinge(c: Tensor, tau: Tensor | float, power: int) -> tuple[Tensor, Tensor]:
    """``φ(c) = max(0, |c| − τ)^q`` and ``dφ/dc`` (q ∈ {1, 2}); ``φ'`` is 0 where ``|c| ≤ τ``."""
    m = (c.abs() - tau).clamp_min(0)
    sgn = torch.sign(c)
    if power == 1:
        return m, sgn * (m > 0).to(c.dtype)
    if power == 2:
        return m * m, 2 * m * sgn
    raise ValueError(f"power must be 1 or 2, got {power}")


def _as_vec(x: Tensor | float, n: int, ref: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        x = x.to(device=ref.device, dtype=ref.dtype)
        return x.expand(n) if x.dim() == 0 else x
    return torch.full((n,), float(x), device=ref.device, dtype=ref.dtype)


def _csr(F: int, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
    """``[F, F]`` CSR matrix from row-major sorted unique ``(rows, cols)``."""
    crow = torch.zeros(F + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=F), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols, values, (F, F))


class _PairPenalty(torch.autograd.Function):
    """``Σ_p w_p φ(d_{i_p}·d_{j_p})`` over unique row-major sorted pairs, via CSR SDDMM / SpMM."""

    @staticmethod
    def forward(ctx: Any, W: Tensor, rows: Tensor, cols: Tensor, w: Tensor, tau: Tensor,
                power: int) -> tuple[Tensor, Tensor]:
        F = W.shape[0]
        pattern = _csr(F, rows, cols, torch.ones_like(w))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = torch.sparse.sampled_addmm(pattern, W, W.T, beta=0.0).values()
        v, dv = _hinge(c, tau, power)
        ctx.save_for_backward(W, rows, cols, w * dv)
        ctx.mark_non_differentiable(c)
        return (w * v).sum(dtype=torch.float64).to(W.dtype), c

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_cos: Tensor) -> tuple[Tensor | None, ...]:
        W, rows, cols, g = ctx.saved_tensors
        F = W.shape[0]
        # ∂/∂W = (S + Sᵀ) W as one symmetric sparse product: one dense [F, d] output instead of two
        # (measured 2.2× faster than S·W + Sᵀ·W at P = F = 16 384 on CPU)
        gg = g * grad
        S = torch.sparse_coo_tensor(torch.stack([torch.cat([rows, cols]), torch.cat([cols, rows])]),
                                    torch.cat([gg, gg]), (F, F))
        return torch.sparse.mm(S, W), None, None, None, None, None


def pair_penalty_sorted(W: Tensor, keys: Tensor, weight: Tensor | float, tau: Tensor | float = 0.0,
                        power: int = 1) -> tuple[Tensor, Tensor]:
    """:func:`pair_penalty` for sorted unique keys ``i·F + j`` (``i < j``) ``[P]``; cos in key order."""
    n = int(keys.numel())
    if n == 0:
        return W.sum() * 0.0, W.new_zeros(0)
    F = W.shape[0]
    keys = keys.to(W.device)
    return _PairPenalty.apply(W, keys // F, keys % F, _as_vec(weight, n, W), _as_vec(tau, n, W), power)


def pair_penalty(W: Tensor, i: Tensor, j: Tensor, weight: Tensor | float, tau: Tensor | float = 0.0,
                 power: int = 1) -> tuple[Tensor, Tensor]:
    """``Σ_p w_p · max(0, |cos(d_{i_p}, d_{j_p})| − τ_p)^power`` for pairs ``(i_p, j_p)`` ``[P]``, ``i ≠ j``.

    ``W`` ``[F, d]`` has unit rows, so ``cos = d_i·d_j``. Repeated (unordered) pairs are merged by
    adding their weights (they must share ``τ``). Returns ``(scalar, cos [P] detached, input order)``.
    Cost ``O(P·d + P log P)``; extra memory ``O(P)``.
    """
    n = int(i.numel())
    if n == 0:
        return W.sum() * 0.0, W.new_zeros(0)
    i, j = i.to(W.device), j.to(W.device)
    if bool((i == j).any()):
        raise ValueError("pair_penalty: a pair (i, i) has cos = 1 by construction")
    g = group_keys(pair_keys(i, j, W.shape[0]))
    w = _as_vec(weight, n, W)[g.perm]
    w_u = torch.zeros(g.keys.numel(), device=W.device, dtype=W.dtype).index_add_(0, g.grp, w)
    tau_u = _as_vec(tau, n, W)[g.perm][g.starts]
    val, c = pair_penalty_sorted(W, g.keys, w_u, tau_u, power)
    return val, c[g.inverse()]


class _TokenPairPenalty(torch.autograd.Function):
    """``Σ_{b,a,a'} w_baa' φ(G_b[a, a'])`` with ``G_b`` the Gram matrix of token ``b``'s decoder rows."""

    @staticmethod
    def forward(ctx: Any, W: Tensor, idx: Tensor, w: Tensor, tau: Tensor, power: int,
                chunk: int) -> tuple[Tensor, Tensor]:
        B, K = idx.shape
        d = W.shape[1]
        total = W.new_zeros((), dtype=torch.float64)
        g = torch.zeros_like(w)
        cos = torch.zeros_like(w)
        live = (w != 0).flatten(1).any(1)
        buf = W.new_empty(min(chunk, B) * K, d)
        for s in range(0, B, chunk):
            e = min(s + chunk, B)
            if not bool(live[s:e].any()):
                continue
            Wg = torch.index_select(W, 0, idx[s:e].reshape(-1), out=buf[: (e - s) * K]).view(e - s, K, d)
            G = torch.bmm(Wg, Wg.transpose(1, 2))
            v, dv = _hinge(G, tau[s:e], power)
            total += (w[s:e] * v).sum(dtype=torch.float64)
            g[s:e] = w[s:e] * dv
            cos[s:e] = G
        ctx.save_for_backward(W, idx, g, live)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(cos)
        return total.to(W.dtype), cos

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_cos: Tensor) -> tuple[Tensor | None, ...]:
        W, idx, g, live = ctx.saved_tensors
        B, K = idx.shape
        d = W.shape[1]
        gW = torch.zeros_like(W)
        buf = W.new_empty(min(ctx.chunk, B) * K, d)
        for s in range(0, B, ctx.chunk):
            e = min(s + ctx.chunk, B)
            if not bool(live[s:e].any()):
                continue
            flat = idx[s:e].reshape(-1)
            Wg = torch.index_select(W, 0, flat, out=buf[: (e - s) * K]).view(e - s, K, d)
            dG = g[s:e] + g[s:e].transpose(1, 2)
            gW.scatter_add_(0, flat[:, None].expand(-1, d), torch.bmm(dG, Wg).mul_(grad).view(-1, d))
        return gW, None, None, None, None, None


def token_pair_penalty(W: Tensor, idx: Tensor, slot_weight: Tensor, slot_tau: Tensor | float = 0.0,
                       power: int = 1, chunk: int = TOKEN_CHUNK) -> tuple[Tensor, Tensor]:
    """``Σ_{b,a,a'} w_baa' · max(0, |d_{idx[b,a]}·d_{idx[b,a']}| − τ_baa')^power`` over slot pairs.

    ``idx`` ``[B, K]``; ``slot_weight``/``slot_tau`` ``[B, K, K]`` (weight 0 = not penalised; use only
    ``a < a'`` to count each pair once). Returns ``(scalar, the Gram matrices [B, K, K] detached)``.
    Cost ``O(B·K²·d)`` in batched matmuls; extra memory ``O(chunk·K·d + B·K²)``.
    """
    if slot_weight.numel() == 0:
        return W.sum() * 0.0, slot_weight.new_zeros(slot_weight.shape)
    tau = slot_tau if isinstance(slot_tau, Tensor) else torch.full_like(slot_weight, float(slot_tau))
    return _TokenPairPenalty.apply(W, idx.to(W.device), slot_weight.to(W.dtype),
                                   tau.to(W.dtype).expand_as(slot_weight).contiguous(), power, chunk)


def cofiring_penalty(W: Tensor, cof: CoFiring, weight: Tensor, tau: Tensor | float = 0.0,
                     power: int = 1, path: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """``Σ_p w_p · max(0, |cos_p| − τ_p)^power`` over the co-firing pairs ``p`` of ``cof`` (``w = 0`` skips).

    ``weight``/``tau`` are per pair ``[P]``. ``path``: ``"pairs"`` (:func:`pair_penalty_sorted` on the
    pairs with ``w ≠ 0``), ``"tokens"`` (:func:`token_pair_penalty`, each pair's weight split evenly
    over its ``counts`` occurrences), or ``"auto"``: tokens when the selected pairs have more than
    ``TOKEN_PATH_FRACTION`` × the batch's co-firing occurrences (the token path's cost is fixed by
    ``B·K²·d``, the pair path's grows with the number of pairs).
    Returns ``(scalar, selected pair indices [n], their cos [n] detached)``.
    """
    sel = (weight != 0).nonzero().squeeze(1)
    if sel.numel() == 0:
        return W.sum() * 0.0, sel, W.new_zeros(0)
    tau_v = _as_vec(tau, cof.n_pairs, weight)
    small_grid = cof.n_tokens * cof.K * cof.K <= TOKEN_GRID_MAX
    use_tokens = path == "tokens" or (path == "auto" and small_grid and sel.numel() > TOKEN_PATH_FRACTION * cof.n_occ)
    if not use_tokens:
        val, cos = pair_penalty_sorted(W, cof.keys[sel], weight[sel], tau_v[sel], power)
        return val, sel, cos
    grid = (cof.n_tokens, cof.K, cof.K)
    n_grid = cof.n_tokens * cof.K * cof.K
    occ_w = (weight / cof.counts.to(weight.dtype))[cof.grp]
    slot_w = weight.new_zeros(n_grid).index_copy_(0, cof.occ_pos, occ_w).view(grid)
    slot_t = weight.new_zeros(n_grid).index_copy_(0, cof.occ_pos, tau_v[cof.grp]).view(grid)
    val, gram = token_pair_penalty(W, cof.idx, slot_w, slot_t, power)
    return val, sel, gram.reshape(-1)[cof.first_pos[sel]]


def jaccard(a: Tensor, b: Tensor) -> float:
    """Jaccard overlap ``|A ∩ B| / |A ∪ B|`` of two sets of int64 keys (1.0 when both are empty)."""
    a, b = torch.unique(a), torch.unique(b)
    union = a.numel() + b.numel()
    if union == 0:
        return 1.0
    inter = int(torch.isin(a, b).sum())
    return inter / (union - inter)


class SparseStatePenalty(Penalty):
    """A penalty with buffers whose size changes during training (sparse pair state).

    ``nn.Module.load_state_dict`` copies into existing buffers and so requires equal shapes; the
    buffers named in ``resizable`` are re-allocated to the saved shape first, so a checkpoint taken
    at any point restores exactly.
    """

    resizable: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        for name in self.resizable:
            key = prefix + name
            cur = self._buffers.get(name)
            if key in state_dict and cur is not None and cur.shape != state_dict[key].shape:
                self._buffers[name] = cur.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
