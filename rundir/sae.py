"""The sparse autoencoder and its on-disk format (SAELens layout: safetensors + cfg.json).

Math (Bricken et al. 2023 for the ReLU SAE; Gao et al. 2024, arXiv 2406.04093, for TopK; Rajamanoharan et al. 2024,
arXiv 2407.14435, for JumpReLU):
    pre = (x − b_dec) W_enc + b_enc            x: [batch, d_in], pre: [batch, d_sae]
    f   = σ(pre)      σ = ReLU; TopK(k) followed by ReLU; or JumpReLU_θ(pre) = ReLU(pre)·H(pre − θ)
    x̂   = f W_dec + b_dec                      W_dec rows are kept unit-norm during training

This class is the *inference* SAE: the three saved forms (SAELens ``architecture`` ``standard``,
``topk``, ``jumprelu``). How it was trained (BatchTopK, Matryoshka, JumpReLU with its STE...) is
the business of ``train/archs``; BatchTopK and Matryoshka SAEs are saved as JumpReLU, as SAELens
and dictionary_learning do.

Sparse codes (:class:`~sae.rundir.codes.SparseCodes`: padded ``[batch, K]`` or ragged entries)
make the decoder cost ``n_entries·d_in`` instead of ``batch·d_sae·d_in`` (``embedding_bag``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import SAELoadError
from .canonical import Canonical
from .codes import SparseCodes
from .format import CFG_FILE, WEIGHTS_FILE

ACTIVATIONS = ("topk", "relu", "jumprelu")
SAVED_ARCHITECTURE = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu"}


class SAE(nn.Module):
    """A TopK, ReLU or JumpReLU sparse autoencoder over ``d_in``-dimensional activations.

    Args:
        d_in: input width (the model's ``d_model``). d_sae: number of latents.
        activation: ``"topk"`` (exactly ``k`` active per token), ``"relu"``, or ``"jumprelu"``
            (latent i active where ``pre_i > threshold_i``; the ``threshold [d_sae]`` buffer, in
            pre-activation units, is saved as SAELens' ``threshold`` tensor).
        k: active latents per token for ``topk``.
    """

    def __init__(self, d_in: int, d_sae: int, activation: str = "topk", k: int = 32,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose {', '.join(ACTIVATIONS)}")
        if activation == "topk" and not 0 < k <= d_sae:
            raise ValueError(f"k={k} must be in 1..d_sae={d_sae}")
        self.d_in, self.d_sae, self.activation, self.k = d_in, d_sae, activation, k
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        if activation == "jumprelu":
            self.register_buffer("threshold", torch.zeros(d_sae, **kw))
        self.cfg: dict = {}

    # -- initialisation and decoder constraint --------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, b_dec: torch.Tensor | None = None) -> None:
        """Random unit decoder rows, ``W_enc = W_decᵀ``, ``b_enc = 0``, ``b_dec`` = data mean if given.

        (Never zeros: the research logs' zero init cannot learn.)
        """
        w = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.copy_(b_dec if b_dec is not None else torch.zeros(self.d_in))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Renormalise decoder rows to unit norm (after each optimiser step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row: g_i ← g_i − (g_i·d_i) d_i."""
        g, W = self.W_dec.grad, self.W_dec
        if g is not None:  # row dot products by a batched [1, d]·[d, 1] product and an in-place update:
            # no [d_sae, d_in] temporaries (4.2× faster than (g * W).sum(1) * W at 8192 × 2304 on CPU)
            dots = torch.bmm(g.unsqueeze(1), W.unsqueeze(2)).view(-1, 1)
            g.addcmul_(dots, W, value=-1.0)

    # -- forward ----------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, d_in]`` → pre-activations ``[batch, d_sae]``."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def codes_from_pre(self, pre: torch.Tensor) -> SparseCodes:
        """Sparse codes from pre-activations. ReLU/JumpReLU: ``K`` = largest active count in the
        batch (other rows padded with value-0 slots)."""
        if self.activation == "topk":
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            return SparseCodes(F.relu(vals), idx)
        f = F.relu(pre)
        if self.activation == "jumprelu":
            f = f * (pre > self.threshold)
        kmax = max(int((f > 0).sum(-1).max()), 1)
        vals, idx = f.topk(kmax, dim=-1, sorted=False)
        return SparseCodes(vals, idx)

    def encode_sparse(self, x: torch.Tensor) -> SparseCodes:
        return self.codes_from_pre(self.pre_acts(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, d_in]`` → dense codes ``f [batch, d_sae]``."""
        if self.activation == "relu":
            return F.relu(self.pre_acts(x))
        if self.activation == "jumprelu":
            pre = self.pre_acts(x)
            return F.relu(pre) * (pre > self.threshold)
        return self.encode_sparse(x).to_dense(self.d_sae)

    def decode_sparse(self, codes: SparseCodes, bias: bool = True) -> torch.Tensor:
        """``x̂ = Σ_j vals_j W_dec[idx_j] (+ b_dec)`` → ``[batch, d_in]``. Variable-count codes
        (ragged, or padded with ``live``) are decoded from their flat entries: one ragged
        ``embedding_bag``, same result and gradients, cost ``n_entries·d_in``."""
        if codes.variable:
            rows, lat, v = codes.entries()
            counts = torch.bincount(rows, minlength=codes.batch)
            out = F.embedding_bag(lat, self.W_dec, counts.cumsum(0) - counts, per_sample_weights=v, mode="sum")
            return out + self.b_dec if bias else out
        out = F.embedding_bag(codes.idx, self.W_dec, per_sample_weights=codes.vals, mode="sum")
        return out + self.b_dec if bias else out

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Dense codes ``[batch, d_sae]`` → ``[batch, d_in]``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``x̂ [batch, d_in]``."""
        return self.decode_sparse(self.encode_sparse(x))

    # -- persistence ------------------------------------------------------------------------------
    @torch.no_grad()
    def folded(self, scale: float) -> SAE:
        """A copy that works on raw activations when this SAE was trained on ``scale · x``.

        ``W_enc·s``, ``b_dec/s``, ``W_dec/s`` make ``f(x)`` equal the trained ``f(s·x)`` and
        ``x̂(x) = x̂_trained(s·x)/s`` (SAELens folds its activation normalisation the same way).
        """
        out = SAE(self.d_in, self.d_sae, self.activation, self.k, device=self.W_enc.device, dtype=self.W_enc.dtype)
        out.W_enc.copy_(self.W_enc * scale)
        out.b_enc.copy_(self.b_enc)
        out.W_dec.copy_(self.W_dec / scale)
        out.b_dec.copy_(self.b_dec / scale)
        if self.activation == "jumprelu":
            out.threshold.copy_(self.threshold)  # pre-activations are unchanged by the fold
        out.cfg = dict(self.cfg)
        return out

    @torch.no_grad()
    def with_unit_decoder(self, rtol: float = 1e-5) -> SAE | None:
        """A copy with unit-norm decoder rows and the same reconstructions (SAELens' ``fold_W_dec_norm``).

        With ``n_i = ‖W_dec,i‖``: ``W_enc,i ← n_i W_enc,i``, ``b_enc,i ← n_i b_enc,i``, ``θ_i ← n_i θ_i``,
        ``W_dec,i ← W_dec,i / n_i``, so every code is multiplied by ``n_i`` (a latent's value is then
        the norm of its contribution to x̂, in activation units) and ``x̂`` is unchanged. ReLU and
        JumpReLU commute with a positive scale; TopK's selection only when all ``n_i`` are equal
        (to ``rtol``), so a TopK SAE with unequal norms returns ``None`` (folding would change it).
        """
        n = self.W_dec.double().norm(dim=1)
        uniform = float((n.max() - n.min()) / n.max().clamp_min(1e-30)) <= rtol
        if self.activation == "topk" and not uniform:
            return None
        out = SAE(self.d_in, self.d_sae, self.activation, self.k, device=self.W_enc.device, dtype=self.W_enc.dtype)
        if uniform:  # one scale (rows normalised in training differ only by rounding): TopK ties and a
            n = n.mean().expand_as(n)  # BatchTopK's single θ stay exactly as they were
        out.W_enc.copy_(self.W_enc.double() * n)
        out.b_enc.copy_(self.b_enc.double() * n)
        out.W_dec.copy_(self.W_dec.double() / n[:, None])
        out.b_dec.copy_(self.b_dec)
        if self.activation == "jumprelu":
            out.threshold.copy_(self.threshold.double() * n)
        out.cfg = dict(self.cfg)
        return out

    def save(self, run_dir: str | Path, cfg: dict) -> None:
        """Write ``sae_weights.safetensors`` (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec,
        and for JumpReLU ``threshold [d_sae]``: exactly the state dict SAELens 6 loads strictly) and
        ``cfg.json`` (``cfg`` plus the architecture fields)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        names = self.tensor_names()
        tensors = {n: getattr(self, n).detach().float().cpu().contiguous() for n in names}
        save_file(tensors, str(run_dir / WEIGHTS_FILE))
        full = dict(cfg)
        full.update(self.arch_cfg())
        (run_dir / CFG_FILE).write_text(json.dumps(full, indent=2, sort_keys=True))
        self.cfg = full

    def tensor_names(self) -> tuple[str, ...]:
        """Names of the saved tensors (SAELens' state-dict keys for this architecture)."""
        base = ("W_enc", "W_dec", "b_enc", "b_dec")
        return (*base, "threshold") if self.activation == "jumprelu" else base

    def arch_cfg(self) -> dict:
        """Architecture fields of ``cfg.json`` (SAELens names: ``architecture`` ``standard`` /
        ``topk`` / ``jumprelu``; ``activation_fn_str`` is ``relu`` for JumpReLU, whose mask is the
        ``threshold`` tensor, as SAELens' ``JumpReLUSAE.encode`` applies it)."""
        return {
            "d_in": self.d_in, "d_sae": self.d_sae,
            "architecture": SAVED_ARCHITECTURE[self.activation],
            "activation_fn_str": "topk" if self.activation == "topk" else "relu",
            "activation_fn_kwargs": {"k": self.k} if self.activation == "topk" else {},
            "k": self.k if self.activation == "topk" else None,
            "apply_b_dec_to_input": True, "dtype": "float32",
            # SAELens TopKSAE: multiply pre-activations by ‖W_dec,i‖ (all 1 for a unit decoder, so the
            # same codes) — which is what lets SAELens' fold_W_dec_norm() accept our TopK SAEs
            "rescale_acts_by_decoder_norm": self.activation == "topk" and self.has_unit_decoder(),
        }

    @torch.no_grad()
    def has_unit_decoder(self, atol: float = 1e-5) -> bool:
        """Whether every decoder row has norm 1 (to ``atol``)."""
        return bool(((self.W_dec.double().norm(dim=1) - 1).abs() <= atol).all())

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu",
             activation_scale: float | None = None) -> SAE:
        """Load any SAELens-layout directory (``cfg.json`` + ``sae_weights.safetensors``): ours, or one
        SAELens pre-6 or 6.x wrote, of architecture standard / topk / jumprelu / gated / batchtopk /
        matryoshka_batchtopk (see :mod:`sae.rundir.saelens` for the exact conversions). ``.cfg``
        holds ``cfg.json`` with ``hook_name``, ``model_name``… moved from ``metadata`` to the top level.

        Validated: ``cfg.json`` parses and names ``d_in``/``d_sae``; the safetensors file parses and
        holds the architecture's tensors at the shapes ``cfg.json`` implies, all finite.
        ``activation_scale``: for SAELens ``expected_average_only_in`` files, the factor to fold.

        Raises:
            FileNotFoundError: the directory has no SAE (with a hint).
            SAELoadError: an unreadable or inconsistent ``cfg.json`` / weights file, or an
                architecture we cannot run (one line naming it; never a silent fallback).
            NonFiniteError: a weight tensor holds NaN or inf.
        """
        from ..errors import NonFiniteError
        from .saelens import to_canonical

        run_dir = Path(run_dir)
        if not (run_dir / WEIGHTS_FILE).exists() or not (run_dir / CFG_FILE).exists():
            hint = ("it looks like a sparsify or dictionary_learning checkpoint: `sae import "
                    f"{run_dir} --from sparsify|dictionary_learning --out RUN_DIR` converts it"
                    if any((run_dir / n).exists() for n in ("sae.safetensors", "ae.pt"))
                    else "is it a finished `sae train` run?")
            raise FileNotFoundError(f"{run_dir} has no {WEIGHTS_FILE} + {CFG_FILE}: {hint}")
        cfg = read_cfg(run_dir)
        try:
            tensors = load_file(str(run_dir / WEIGHTS_FILE))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
            raise SAELoadError(f"{run_dir / WEIGHTS_FILE} is not a readable safetensors file "
                               f"({_first_line(e)}); re-train the run or restore the file") from None
        for n, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{run_dir / WEIGHTS_FILE}: {n} contains NaN or inf; this SAE cannot be "
                                     "evaluated (re-train it, e.g. with a lower --lr)")
        return cls.from_canonical(to_canonical(cfg, tensors, str(run_dir / WEIGHTS_FILE), activation_scale),
                                  device=device)

    @classmethod
    def from_canonical(cls, c: Canonical, device: str | torch.device = "cpu") -> SAE:
        """Build the SAE a :class:`~sae.rundir.canonical.Canonical` describes (``.cfg`` = ``c.cfg``)."""
        from ..errors import NonFiniteError

        sae = cls(c.d_in, c.d_sae, c.activation, c.k, device=device)
        with torch.no_grad():
            for n in sae.tensor_names():
                t = c.tensors[n]
                if not bool(torch.isfinite(t).all()):  # e.g. a fold overflowed float32
                    raise NonFiniteError(f"{n} is not finite after conversion ({', '.join(c.folds)}); "
                                         "the SAE cannot be run in float32")
                getattr(sae, n).copy_(t)
        sae.cfg = dict(c.cfg)
        return sae


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0]}" if text else e.__class__.__name__


def read_cfg(run_dir: str | Path) -> dict:
    """``run_dir/cfg.json`` as a dict. Raises ``SAELoadError`` (file and line) when it is not a JSON object."""
    path = Path(run_dir) / CFG_FILE
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SAELoadError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                           "re-train the run or fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SAELoadError(f"{path} cannot be read ({e.__class__.__name__}); check its permissions") from None
    if not isinstance(cfg, dict):
        raise SAELoadError(f"{path} is not a JSON object; re-train the run or fix the file")
    return cfg
