"""Sparse latent codes of one batch, in a padded or a ragged form behind one interface.

* **padded** — ``vals [batch, K]`` (0 = inactive slot), ``idx [batch, K]`` (long latent indices),
  optional ``live [batch, K]`` bool (the slots that carry a value or need a gradient). TopK's
  codes: exactly ``K = k`` slots per token.
* **ragged** — flat entries ``rows [n]`` (non-decreasing token index), ``latents [n]``,
  ``vals [n]``: for a variable number of latents per token (BatchTopK, Matryoshka, JumpReLU). On
  real activations a few high-norm tokens take thousands of latents (2 016 of 5 120 in a batch of
  the embedded store) while the mean is k = 32, so a padded form costs ``batch · K_max`` ≈ 60×
  the ``batch · k`` entries; the ragged form costs ``n``.

Every consumer gets what it needs without caring which form it holds: :meth:`SparseCodes.entries`
(the flat form; the decoder, the firing counter, L0, Matryoshka's prefix decodes) or ``vals`` /
``idx`` / ``live`` (the padded form; materialised once on first use from a ragged one — the
co-firing-pair penalties and the evaluations use it). ``vals`` keeps the autograd graph in both.
"""

from __future__ import annotations

import torch


class SparseCodes:
    """Sparse codes ``f [batch, d_sae]`` (see the module docstring).

    Args (padded form): vals ``[batch, K]`` float, idx ``[batch, K]`` long, live ``[batch, K]``
    bool or None (all slots live). Use :meth:`ragged` for the flat form.
    """

    __slots__ = ("_vals", "_idx", "_live", "_entries", "batch", "ragged_form")

    def __init__(self, vals: torch.Tensor, idx: torch.Tensor, live: torch.Tensor | None = None) -> None:
        self._vals, self._idx, self._live = vals, idx, live
        self._entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.batch = int(vals.shape[0])
        self.ragged_form = False

    @classmethod
    def ragged(cls, rows: torch.Tensor, latents: torch.Tensor, vals: torch.Tensor, batch: int) -> SparseCodes:
        """Codes from flat entries: ``rows [n]`` long, non-decreasing (token of each entry),
        ``latents [n]`` long, ``vals [n]`` (0 = an inactive entry kept for its gradient, e.g.
        JumpReLU's kernel band); a token appears at most once per latent."""
        c = cls.__new__(cls)
        c._vals = c._idx = c._live = None  # type: ignore[assignment]  (the ragged form has no padded tensors)
        c._entries = (rows, latents, vals)
        c.batch = int(batch)
        c.ragged_form = True
        return c

    @property
    def variable(self) -> bool:
        """Whether tokens may hold different numbers of entries (ragged, or padded with ``live``)."""
        return self.ragged_form or self._live is not None

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat ``(rows [n], latents [n], vals [n])``, rows non-decreasing (row-major slot order of
        the padded form; its non-live slots left out). Computed once per codes object."""
        if self._entries is None:
            idx, vals = self._idx, self._vals
            if self._live is None:
                B, K = idx.shape
                rows = torch.arange(B, device=idx.device).repeat_interleave(K)
                self._entries = (rows, idx.reshape(-1), vals.reshape(-1))
            else:
                r, s = self._live.nonzero(as_tuple=True)
                self._entries = (r, idx[r, s], vals[r, s])
        return self._entries

    def row_counts(self) -> torch.Tensor:
        """Entries per token ``[batch]`` long (live slots of the padded form)."""
        if not self.variable:
            return torch.full((self.batch,), self._idx.shape[1], dtype=torch.long, device=self._idx.device)
        return torch.bincount(self.entries()[0], minlength=self.batch)

    def n_active(self) -> torch.Tensor:
        """Number of entries with a value > 0 (0-d long tensor, no host read): ``L0 · batch``."""
        if not self.variable:
            return (self._vals > 0).sum()
        return (self.entries()[2] > 0).sum()

    def _pad(self) -> None:
        rows, lat, v = self.entries()
        B = self.batch
        counts = torch.bincount(rows, minlength=B)
        K = max(int(counts.max()), 1) if rows.numel() else 1
        slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
        self._idx = torch.zeros(B, K, dtype=torch.long, device=rows.device).index_put_((rows, slot), lat)
        self._live = torch.zeros(B, K, dtype=torch.bool, device=rows.device).index_put_(
            (rows, slot), torch.ones_like(lat, dtype=torch.bool))
        self._vals = v.new_zeros(B, K).index_put((rows, slot), v)  # differentiable in v

    @property
    def vals(self) -> torch.Tensor:
        """``[batch, K]`` values (0 = inactive slot); materialises the padded form of ragged codes."""
        if self._vals is None:
            self._pad()
        return self._vals

    @property
    def idx(self) -> torch.Tensor:
        """``[batch, K]`` latent indices (padding slots: any index, value 0, not live)."""
        if self._idx is None:
            self._pad()
        return self._idx

    @property
    def live(self) -> torch.Tensor | None:
        """``[batch, K]`` bool live slots, or None when every slot is live."""
        if self.ragged_form and self._idx is None:
            self._pad()
        return self._live

    def to_dense(self, d_sae: int) -> torch.Tensor:
        """``[batch, d_sae]`` dense codes."""
        rows, lat, v = self.entries()
        out = v.new_zeros(self.batch, d_sae)
        return out.index_put((rows, lat), v, accumulate=True)

    def __repr__(self) -> str:
        form = "ragged" if self.ragged_form else "padded"
        return f"SparseCodes({form}, batch={self.batch}, entries={int(self.entries()[0].numel())})"
