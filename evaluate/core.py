"""Core evaluation: reconstruction, sparsity and model-behaviour metrics of one SAE (SAEBench "core").

Data: the held-out split (``split="test"``) of the SAE's dataset (``cfg.json`` ``dataset_path``, or
the store's ``dataset``), packed into ``BOS``-first sequences of the SAE's ``context_size``.

Exclusions (``exclude_special=True``, the default; SAEBench's
``exclude_special_tokens_from_reconstruction``): a position is *special* when its token is one of
the tokenizer's special ids (BOS, EOS, PAD, UNK, ...). Gemma's BOS residual has a norm of ~40 000
against ~3 000 elsewhere, and our SAEs never see it in training, so

* reconstruction and sparsity metrics average over non-special positions only;
* splicing the SAE into the model replaces ``resid_post`` by ``x̂`` at non-special positions and
  keeps the clean activation at special ones; zero-ablation likewise zeroes non-special positions
  only (SAEBench zero-ablates every position; we keep BOS so that the ablation baseline differs
  from the SAE run only where the SAE acts);
* CE and KL average over *predicted* positions ``t`` (logits at ``t`` scoring token ``t+1``) whose
  target token ``t+1`` is not special (we do not score predicting a document boundary; the last
  position has no target and is never scored).

With ``exclude_special=False`` every position is reconstructed, spliced, ablated and scored.

Formulas (``x`` = model activation ``[d_in]``, ``x̂`` = SAE reconstruction, ``f`` = codes
``[d_sae]``, N = scored tokens; sums run over scored tokens):

* ``mse`` = Σ‖x − x̂‖² / (N·d_in) — mean over tokens *and* dimensions (SAEBench's core divides
  each token's summed squared error by the batch's token count before averaging: not comparable).
* ``explained_variance`` = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean over the scored tokens
  (ratio of sums, SAELens' training ``explained_variance``; SAEBench's core, like SAELens'
  ``explained_variance_legacy``, averages the per-token ratio 1 − ‖x − x̂‖²/‖x − x̄‖² instead).
* ``cossim`` = mean cos(x, x̂); ``l2_ratio`` = mean ‖x̂‖/‖x‖; ``l2_norm_in/out`` = mean ‖x‖, ‖x̂‖.
* ``relative_reconstruction_bias`` γ = E‖x̂‖² / E⟨x, x̂⟩ (Rajamanoharan et al. 2024, "Gated SAEs",
  eq. 10, as computed by SAEBench and dictionary_learning): the γ minimising E‖x̂/γ − x‖²; γ < 1
  means shrinkage. Unlike SAEBench (per-batch ratio, then averaged) both expectations run over
  all scored tokens.
* ``l0`` = mean #{i : f_i > 0}; ``l1`` = mean Σ|f_i|.
* feature density of latent i = fraction of scored tokens with f_i > 0; ``frac_dead`` = fraction
  of latents that never fire on the eval tokens (a short eval overstates deadness);
  ``frac_dense`` = fraction with density > ``dense_threshold`` (strict, like SAEBench's
  ``freq_over_10_percent`` for the default 0.1). SAEBench's ``frac_alive``,
  ``freq_over_{1,10}_percent`` and ``normalized_freq_over_{1,10}_percent`` are reported too.
* ``ce_loss_score`` = (CE_zero_abl − CE_sae) / (CE_zero_abl − CE_clean) and ``kl_div_score`` =
  (KL_abl − KL_sae) / KL_abl, KL = KL(p_clean ‖ p_patched) of next-token distributions, each a
  mean over the scored positions (SAEBench / SAELens ``get_recons_loss``).

The SAE-independent part — tokens, clean activations, clean and zero-ablated CE, KL of the
ablation, and (within a memory budget) the clean log-probabilities — is a :class:`CoreReference`,
computed once per (model, hook, dataset, context size, token count) and shared by every SAE.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..model import LoadedModel, layer_of_hook, logits, splice
from ..progress import progress_bar
from ..rundir.identity import check_compatible
from ..rundir.sae import SAE
from .common import (
    EvalSet,
    batches,
    forward_with_capture,
    load_eval_set,
    model_fingerprints,
    model_hook_names,
    non_special_mask,
)
from .registry import EvalContext, EvalOutput

EVAL_TYPE_ID = "core"
DEFAULT_CONTEXT_SIZE = 128

__all__ = ["EVAL_TYPE_ID", "Config", "CoreConfig", "CoreReference", "check_compatible", "compute_reference",
           "metric_categories", "resolve_config", "result_stem", "run", "run_core", "run_core_many", "run_many"]


@dataclass
class CoreConfig:
    """Settings of the core evaluation (recorded as ``eval_config`` in the result file)."""

    n_eval_tokens: int = 16384
    """Held-out tokens to evaluate (BOS included): ``ceil(n / context_size)`` sequences, spread over
    the split's documents and sources (:func:`~sae.evaluate.common.load_eval_set`)."""
    n_bootstrap: int = 1000
    """Bootstrap resamples of *documents* for the 95 % confidence intervals (0: none)."""
    batch_size: int = 16
    """Sequences per forward pass."""
    context_size: int | None = None
    """Tokens per sequence, BOS included; None → the store's / the SAE's ``context_size``."""
    dataset: str | None = None
    """Dataset spec; None → the store's ``dataset`` / the SAE cfg's ``dataset_path`` / embedded."""
    split: str = "test"
    """Corpus split; ``test`` holds documents never used for harvesting or training."""
    dense_threshold: float = 0.1
    """A latent is dense when it fires on more than this fraction of tokens (SAEBench: 10%)."""
    exclude_special: bool = True
    """Skip BOS/EOS/PAD/... positions in metrics, splicing and ablation (see module doc)."""
    device: str = "auto"
    """Where :func:`sae.evaluate.evaluate_runs` loads model and SAE; ``run_core`` uses the model's device."""
    seed: int = 0
    """Document order of the corpus (``iter_documents`` seed)."""
    compat: str = "ours"
    """``ours`` (module doc) or ``saebench``: SAEBench core / SAELens ``get_recons_loss`` exactly —
    zero-ablation of *every* position, CE over positions whose *input* token is not special, KL
    over every non-special position (the last included), ``explained_variance`` the per-token mean
    of 1 − ‖x − x̂‖²/‖x − x̄_batch‖² (``explained_variance_legacy``), ``mse`` summed over d_in."""
    max_cached_logprob_gib: float = 2.0
    """Keep clean log-probs of all scored positions in memory up to this size (saves one forward per
    batch and SAE); above it the clean logits are recomputed for each SAE."""
    ranges = {"n_eval_tokens": ">=1", "n_bootstrap": ">=0", "batch_size": ">=1", "context_size": ">=2",
              "split": "{train,test}", "dense_threshold": "[0,1]", "seed": ">=0", "compat": "{ours,saebench}",
              "max_cached_logprob_gib": ">=0"}
    """Allowed values of each setting (``params.check_range`` specs), enforced for ``-p core.…``."""


Config = CoreConfig
"""The evaluation contract's name for the settings (:mod:`sae.evaluate.registry`)."""


def resolve_config(cfg: CoreConfig, sae_cfg: dict) -> CoreConfig:
    """``cfg`` with ``dataset`` and ``context_size`` filled from the SAE's ``cfg.json`` when None."""
    dataset = cfg.dataset or sae_cfg.get("dataset_path") or "embedded"
    ctx = cfg.context_size or sae_cfg.get("context_size") or DEFAULT_CONTEXT_SIZE
    return replace(cfg, dataset=str(dataset), context_size=int(ctx))


@dataclass
class _RefBatch:
    """SAE-independent data of one batch of ``b`` sequences of ``T`` tokens (CPU tensors)."""

    tokens: torch.Tensor        # [b, T] int64
    acts: torch.Tensor          # [b, T, d_model] float32, clean resid_post at the hook
    recon_mask: torch.Tensor    # [b, T] bool, positions reconstructed / spliced / scored
    lp_mask: torch.Tensor       # [b, T] bool, positions whose next-token distribution is scored (KL)
    ce_rows: torch.Tensor       # [n_lp] bool, which of those also score CE (they have a target)
    targets: torch.Tensor       # [n_ce] int64, the next token at the CE rows
    lp_seq: torch.Tensor        # [n_lp] int64, the sequence (row of ``tokens``) of each lp row
    seq0: int                   # index of this batch's first sequence in the eval set
    ce_clean: torch.Tensor      # [n_ce] float32 nats
    ce_zero: torch.Tensor       # [n_ce]
    kl_zero: torch.Tensor       # [n_lp]
    clean_logprobs: torch.Tensor | None  # [n_lp, vocab] float32, or None over the memory budget


@dataclass
class CoreReference:
    """Everything the core eval needs that does not depend on the SAE (see :func:`compute_reference`)."""

    key: tuple
    model_id: str
    model_fingerprint: str
    hook_name: str
    batches: list[_RefBatch]
    act_mean: torch.Tensor      # [d_model] float64, mean of x over scored tokens
    total_sq_dev: float         # Σ‖x − x̄‖² over scored tokens
    eval_set: EvalSet
    n_tokens_total: int
    n_tokens_scored: int
    n_positions_ce: int
    n_positions_kl: int
    ce_clean: float
    ce_zero: float
    kl_zero: float
    extra: dict = field(default_factory=dict)

    @property
    def n_sequences(self) -> int:
        return sum(len(b.tokens) for b in self.batches)


def reference_key(lm: LoadedModel, hook_name: str, cfg: CoreConfig) -> tuple:
    """What a :class:`CoreReference` depends on (``cfg`` resolved)."""
    return (lm.fingerprint, hook_name, cfg.dataset, cfg.split, cfg.seed, cfg.context_size, cfg.n_eval_tokens,
            cfg.batch_size, cfg.exclude_special, cfg.compat)


COMPAT_MODES = ("ours", "saebench")


def scored_positions(ids: torch.Tensor, special: list[int], compat: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(recon_mask, ablate_mask, lp_mask, ce_rows)`` for token ids ``[b, T]`` (see :class:`CoreConfig`).

    ours: reconstruct/splice/ablate non-special positions; score position t (CE and KL) when t < T−1
    and its *target* t+1 is not special. saebench: ablate every position; score KL at every position
    whose *input* token is not special, CE at those with t < T−1 (SAELens ``get_recons_loss`` with
    ``ignore_tokens``, as SAEBench core calls it).
    """
    recon = non_special_mask(ids, special)
    b, T = ids.shape
    if compat == "saebench":
        lp = recon.clone()
        pos = torch.arange(T).expand(b, T)
        return recon, torch.ones_like(recon), lp, (pos < T - 1)[lp]
    lp = torch.zeros_like(recon)
    lp[:, :-1] = non_special_mask(ids[:, 1:], special)
    return recon, recon, lp, torch.ones(int(lp.sum()), dtype=torch.bool)


def _targets(ids: torch.Tensor, lp_mask: torch.Tensor, ce_rows: torch.Tensor) -> torch.Tensor:
    """The next token of each CE row: ``ids[:, t+1]`` for the lp positions with t < T−1."""
    nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    return nxt[lp_mask][ce_rows]


def _scored_logprobs(lg: torch.Tensor, lp_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, T, V]`` → float32 log-probs ``[n_lp, V]`` at the positions of ``lp_mask [b, T]``."""
    return F.log_softmax(lg[lp_mask.to(lg.device)].float(), dim=-1)


def _ce(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (nats) ``[n]`` from log-probs ``[n, V]`` and target ids ``[n]``."""
    return -logprobs.gather(1, targets.to(logprobs.device)[:, None])[:, 0]


def _kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """KL(p_ref ‖ p) = Σ_v p_ref (log p_ref − log p) per row → ``[n]`` (nats).

    Computed ``rows`` rows at a time: the same numbers as one call over all rows, without an
    ``[n, V]`` temporary (2 GiB at 2 048 positions × 262k vocabulary; 4× faster on CPU)."""
    ref = ref_logprobs.to(logprobs.device)
    return torch.cat([F.kl_div(logprobs[i:i + rows], ref[i:i + rows], reduction="none", log_target=True).sum(-1)
                      for i in range(0, len(logprobs), rows)]) if len(logprobs) else logprobs.new_zeros(0)


def _masked_patch(mask: torch.Tensor, value: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h [b, T, d] ↦ where(mask, value, h)`` (``value=None``: zeros) for :func:`sae.model.splice`."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        new = torch.zeros_like(h) if value is None else value.to(h.dtype)
        return torch.where(mask.to(h.device)[..., None], new, h)

    return fn


@torch.no_grad()
def compute_reference(lm: LoadedModel, hook_name: str, cfg: CoreConfig, quiet: bool = True) -> CoreReference:
    """Clean activations, clean / zero-ablated CE and ablation KL on the held-out tokens.

    ``cfg`` must be resolved (:func:`resolve_config`). Per batch: one clean forward that also
    records ``resid_post`` at the hook (:func:`forward_with_capture`), one zero-ablated forward.

    Raises:
        ValueError: bad hook name or layer, unknown dataset, empty held-out split.
    """
    if cfg.dataset is None or cfg.context_size is None:
        raise ValueError("compute_reference needs a resolved CoreConfig (dataset and context_size set)")
    layer = layer_of_hook(hook_name)
    eval_set = load_eval_set(lm.tokenizer, lm.bos_token_id, cfg.dataset, cfg.context_size, cfg.n_eval_tokens,
                             cfg.split, cfg.seed)
    tokens = eval_set.tokens
    special = lm.special_token_ids if cfg.exclude_special else []
    budget = cfg.max_cached_logprob_gib * 2**30
    out: list[_RefBatch] = []
    keep_logprobs: bool | None = None
    with progress_bar(quiet, unit="seq") as bar:
        task = bar.add_task(f"core reference {hook_name}", total=len(tokens))
        for sl in batches(len(tokens), cfg.batch_size):
            ids = tokens[sl]
            recon_mask, ablate_mask, lp_mask, ce_rows = scored_positions(ids, special, cfg.compat)
            targets = _targets(ids, lp_mask, ce_rows)
            lg, acts = forward_with_capture(lm, ids, layer)
            if keep_logprobs is None:
                keep_logprobs = len(tokens) * cfg.context_size * lg.shape[-1] * 4 <= budget
            lp_clean = _scored_logprobs(lg, lp_mask)
            del lg
            with splice(lm.model, layer, _masked_patch(ablate_mask, None)):
                lp_zero = _scored_logprobs(logits(lm.model, ids.to(lm.device)), lp_mask)
            rows = ce_rows.to(lp_clean.device)
            out.append(_RefBatch(
                tokens=ids, acts=acts.cpu(), recon_mask=recon_mask, lp_mask=lp_mask, ce_rows=ce_rows, targets=targets,
                lp_seq=lp_mask.nonzero()[:, 0], seq0=sl.start,
                ce_clean=_ce(lp_clean[rows], targets).cpu(), ce_zero=_ce(lp_zero[rows], targets).cpu(),
                kl_zero=_kl(lp_clean, lp_zero).cpu(),
                clean_logprobs=lp_clean.cpu() if keep_logprobs else None))
            del lp_clean, lp_zero
            bar.update(task, advance=len(ids))
    n_scored = sum(int(b.recon_mask.sum()) for b in out)
    if n_scored == 0:
        raise ValueError(f"no non-special tokens in the {len(tokens)} held-out sequences of {cfg.dataset!r}")
    d = out[0].acts.shape[-1]
    total = torch.zeros(d, dtype=torch.float64)
    for b in out:
        total += b.acts[b.recon_mask].double().sum(0)
    mean = total / n_scored
    sq_dev = sum(float(((b.acts[b.recon_mask].double() - mean) ** 2).sum()) for b in out)
    ce_clean, ce_zero, kl_zero = (torch.cat([getattr(b, n) for b in out]).double() for n in
                                  ("ce_clean", "ce_zero", "kl_zero"))
    return CoreReference(
        key=reference_key(lm, hook_name, cfg), model_id=lm.model_id, model_fingerprint=lm.fingerprint,
        hook_name=hook_name, batches=out, act_mean=mean, total_sq_dev=sq_dev, eval_set=eval_set,
        n_tokens_total=int(tokens.numel()), n_tokens_scored=n_scored, n_positions_ce=len(ce_clean),
        n_positions_kl=len(kl_zero),
        ce_clean=_mean(ce_clean), ce_zero=_mean(ce_zero),
        kl_zero=_mean(kl_zero), extra={"clean_logprobs_cached": bool(keep_logprobs)})


def _mean(t: torch.Tensor) -> float:
    return float(t.mean()) if t.numel() else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 and math.isfinite(den) else math.nan


@torch.no_grad()
def run_core(sae: SAE, lm: LoadedModel, cfg: CoreConfig | None = None, reference: CoreReference | None = None,
             quiet: bool = True, run_dir: str | None = None) -> dict:
    """Evaluate ``sae`` (raw activation space, ``sae.cfg`` = its ``cfg.json``) with model ``lm``.

    ``reference`` (from :func:`compute_reference` with the same model, hook and resolved config)
    is reused when given, else computed. The SAE is moved to the model's device.

    Returns ``{"eval_type_id", "eval_config", "metrics", "metric_categories", "details",
    "unstructured"}``: ``metrics`` is flat (``mse``, ``explained_variance``, ``cossim``,
    ``l2_norm_in``, ``l2_norm_out``, ``l2_ratio``, ``relative_reconstruction_bias``, ``l0``, ``l1``,
    ``frac_dead``, ``frac_alive``, ``frac_dense``, ``freq_over_1_percent``, ``freq_over_10_percent``,
    ``normalized_freq_over_{1,10}_percent``, ``ce_loss_clean``, ``ce_loss_with_sae``,
    ``ce_loss_zero_abl``, ``ce_loss_score``, ``kl_div_with_sae``, ``kl_div_with_ablation``,
    ``kl_div_score`` and token counts; CE/KL in nats, ``mse`` in squared activation units);
    ``metric_categories`` the same in SAEBench's groups (:func:`metric_categories`); ``details``
    one dict per latent (``index``, ``feature_density``, ``consistent_activation_heuristic``,
    ``encoder_norm``, ``encoder_bias``, ``encoder_decoder_cosine_sim``) for density histograms.
    Scores are NaN when their denominator is 0.

    Raises:
        IncompatibleSAEError: the SAE does not fit ``lm`` (:func:`check_compatible`).
        ValueError: a ``reference`` computed for another model/hook/config.
    """
    return run_core_many([sae], lm, cfg, reference=reference, quiet=quiet, run_dirs=[run_dir])[0]


def result_stem(cfg: CoreConfig) -> str:
    """The result file's name: ``core`` (ours), ``core_saebench`` (``compat="saebench"``), so the two
    definitions can sit side by side."""
    return EVAL_TYPE_ID if cfg.compat == "ours" else f"{EVAL_TYPE_ID}_{cfg.compat}"


def run_many(saes: list[SAE], ctxs: list[EvalContext], cfg: CoreConfig) -> list[EvalOutput]:
    """The evaluation contract (:mod:`sae.evaluate.registry`) for several SAEs at once: the SAEs that
    share a (model, hook, dataset, context size) share one clean/zero-ablated reference pass and one
    clean forward per batch (:func:`run_core_many`), freed before the next group.

    ``cfg.dataset``/``cfg.context_size`` left None are taken from each SAE's context
    (``ctx.dataset``, ``ctx.context_size``: the store's, else the SAE's). Each result equals its own
    :func:`run_core` call.
    """
    resolved = [replace(cfg, dataset=cfg.dataset or ctx.dataset, context_size=cfg.context_size or ctx.context_size)
                for ctx in ctxs]
    keys = [reference_key(ctx.model, ctx.hook_name, c) for ctx, c in zip(ctxs, resolved, strict=True)]
    outs: list[EvalOutput | None] = [None] * len(saes)
    for key in dict.fromkeys(keys):
        group = [i for i, k in enumerate(keys) if k == key]
        ctx, c = ctxs[group[0]], resolved[group[0]]
        reference = ctx.cached(("core_reference", *key), functools.partial(
            compute_reference, ctx.model, ctx.hook_name, c, quiet=ctx.quiet), persist=True, memory=False)
        res = run_core_many([saes[i] for i in group], ctx.model, c, reference=reference, quiet=ctx.quiet,
                            run_dirs=[str(ctxs[i].run_dir) for i in group])
        del reference
        for i, r in zip(group, res, strict=True):
            outs[i] = EvalOutput(metrics=r["metric_categories"], details=r["details"], eval_config=r["eval_config"],
                                 unstructured=r["unstructured"])
    return outs  # type: ignore[return-value]


def run(sae: SAE, ctx: EvalContext, cfg: CoreConfig) -> EvalOutput:
    """The evaluation contract for one SAE (:func:`run_many` of one)."""
    return run_many([sae], [ctx], cfg)[0]


@torch.no_grad()
def run_core_many(saes: list[SAE], lm: LoadedModel, cfg: CoreConfig | None = None,
                  reference: CoreReference | None = None, quiet: bool = True,
                  run_dirs: list[str | None] | None = None) -> list[dict]:
    """:func:`run_core` for several SAEs on one hook in one pass over the held-out batches.

    Batch by batch, the clean log-probabilities are computed once (or read from ``reference``'s
    cache) and every SAE is spliced in turn, so over the memory budget each SAE costs one forward
    per batch instead of two; each result is identical to its own :func:`run_core` call.

    Raises:
        IncompatibleSAEError: an SAE does not fit ``lm``.
        ValueError: no SAEs; SAEs on different hooks or whose configs resolve to different
            evaluation settings; a ``reference`` computed for another model/hook/config.
    """
    if not saes:
        raise ValueError("run_core_many needs at least one SAE")
    run_dirs = list(run_dirs) if run_dirs is not None else [None] * len(saes)
    if len(run_dirs) != len(saes):
        raise ValueError(f"{len(saes)} SAEs but {len(run_dirs)} run directories")
    cfgs = [resolve_config(cfg or CoreConfig(), s.cfg) for s in saes]
    hooks = {str(s.cfg["hook_name"]) for s in saes}
    if len(hooks) > 1 or any(c != cfgs[0] for c in cfgs):
        raise ValueError("run_core_many evaluates SAEs of one hook and one resolved CoreConfig together: "
                         f"got hooks {sorted(hooks)}; call it once per hook and dataset")
    for s, rd in zip(saes, run_dirs, strict=True):  # before any forward pass
        check_compatible(s.cfg, lm.model_id, model_fingerprints(lm), lm.d_model, model_hook_names(lm),
                         against="model", run_dir=rd)
    hook = hooks.pop()
    if reference is None:
        reference = compute_reference(lm, hook, cfgs[0], quiet=quiet)
    elif reference.key != reference_key(lm, hook, cfgs[0]):
        raise ValueError(f"the core reference was computed for {reference.key}, not "
                         f"{reference_key(lm, hook, cfgs[0])}: "
                         "compute one per (model, hook, dataset, context size, token count)")
    runs = [_CoreRun(s, lm, cfgs[0], rd, reference) for s, rd in zip(saes, run_dirs, strict=True)]
    label = run_dirs[0] if len(runs) == 1 else f"{len(runs)} SAEs"
    with progress_bar(quiet, unit="seq") as bar:
        task = bar.add_task(f"core {label or hook}", total=reference.n_sequences * len(runs))
        for rb in reference.batches:
            ref_lp = rb.clean_logprobs
            if ref_lp is None:
                ref_lp = _scored_logprobs(logits(lm.model, rb.tokens.to(lm.device)), rb.lp_mask)
            for r in runs:
                r.add(rb, ref_lp)
                bar.update(task, advance=len(rb.tokens))
            del ref_lp
    return [r.result(reference) for r in runs]


class _CoreRun:
    """One SAE's running sums over the reference batches (:func:`run_core_many`)."""

    SUMS = ("sq_err", "cos", "ratio", "norm_in", "norm_out", "xhat_sq", "x_dot_xhat", "l0", "l1", "ev_legacy")

    def __init__(self, sae: SAE, lm: LoadedModel, cfg: CoreConfig, run_dir: str | None,
                 reference: CoreReference) -> None:
        self.hook = str(sae.cfg["hook_name"])
        self.layer = layer_of_hook(self.hook)
        self.sae, self.lm, self.cfg, self.run_dir = sae.to(lm.device), lm, cfg, run_dir
        dev, d_sae = lm.device, sae.d_sae
        self.acc = dict.fromkeys(self.SUMS, 0.0)
        self.fire = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.seq_fire = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.ce_sae: list[torch.Tensor] = []
        self.kl_sae: list[torch.Tensor] = []
        self.per_seq = _PerSeq(reference.n_sequences, self.sae.d_in)

    def add(self, rb: _RefBatch, ref_lp: torch.Tensor) -> None:
        """Add one batch; ``ref_lp`` are its clean log-probs at the scored positions ``[n_lp, vocab]``."""
        sae, lm, acc, per_seq = self.sae, self.lm, self.acc, self.per_seq
        dev, d_sae = lm.device, sae.d_sae
        b, T, d = rb.acts.shape
        x = rb.acts.to(dev)
        m = rb.recon_mask.to(dev)
        codes = sae.encode_sparse(x.reshape(-1, d))
        x_hat = sae.decode_sparse(codes).reshape(b, T, d)
        xs, xh = x[m].double(), x_hat[m].double()
        n_in, n_out = xs.norm(dim=-1), xh.norm(dim=-1)
        acc["sq_err"] += float(((xs - xh) ** 2).sum())
        acc["cos"] += float(F.cosine_similarity(xs, xh, dim=-1, eps=1e-12).sum())
        acc["ratio"] += float((n_out / n_in.clamp_min(1e-12)).sum())
        acc["norm_in"] += float(n_in.sum())
        acc["norm_out"] += float(n_out.sum())
        acc["xhat_sq"] += float((n_out ** 2).sum())
        acc["x_dot_xhat"] += float((xs * xh).sum())
        # SAEBench core / SAELens explained_variance_legacy: per token, against this batch's mean
        err = ((xs - xh) ** 2).sum(-1)
        ev_tok = 1 - err / ((xs - xs.mean(0)) ** 2).sum(-1)
        acc["ev_legacy"] += float(ev_tok.sum())
        seq_of_tok = (torch.arange(b, device=dev)[:, None].expand(b, T)[m] + rb.seq0).cpu()
        per_seq.add_tokens(seq_of_tok, xs.cpu(), err.cpu(), ev_tok.cpu())
        mf = m.reshape(-1)
        vals, idx = codes.vals[mf], codes.idx[mf]
        active = vals > 0
        acc["l0"] += float(active.sum())
        per_seq.add("l0", seq_of_tok, active.sum(-1).double().cpu())
        acc["l1"] += float(vals.abs().sum())
        self.fire += torch.bincount(idx[active], minlength=d_sae).double()
        seq_of = torch.arange(b, device=dev).repeat_interleave(T)[mf][:, None].expand_as(idx)
        pairs = torch.unique(seq_of[active] * d_sae + idx[active])
        self.seq_fire += torch.bincount(pairs % d_sae, minlength=d_sae).double()

        ids = rb.tokens.to(dev)
        with splice(lm.model, self.layer, _masked_patch(m, x_hat)):
            lp = _scored_logprobs(logits(lm.model, ids), rb.lp_mask)
        self.ce_sae.append(_ce(lp[rb.ce_rows.to(lp.device)], rb.targets).cpu())
        self.kl_sae.append(_kl(ref_lp, lp).cpu())
        lp_seq = rb.lp_seq + rb.seq0
        per_seq.add_scores(lp_seq, rb.ce_rows, rb.ce_clean, self.ce_sae[-1], rb.ce_zero, rb.kl_zero, self.kl_sae[-1])
        del lp

    def result(self, reference: CoreReference) -> dict:
        """The result dict of :func:`run_core` once every batch was added."""
        sae, lm, cfg, run_dir, hook = self.sae, self.lm, self.cfg, self.run_dir, self.hook
        acc, fire, seq_fire, ce_sae, kl_sae, per_seq = (self.acc, self.fire, self.seq_fire, self.ce_sae,
                                                        self.kl_sae, self.per_seq)
        N = reference.n_tokens_scored
        d_in = sae.d_in
        density = (fire / N).cpu()
        ev_ratio = 1.0 - _ratio(acc["sq_err"], reference.total_sq_dev)
        saebench = cfg.compat == "saebench"
        metrics: dict[str, float] = {
            "mse": acc["sq_err"] / N if saebench else acc["sq_err"] / (N * d_in),
            "explained_variance": acc["ev_legacy"] / N if saebench else ev_ratio,
            "explained_variance_ratio": ev_ratio,
            "explained_variance_legacy": acc["ev_legacy"] / N,
            "cossim": acc["cos"] / N,
            "l2_norm_in": acc["norm_in"] / N,
            "l2_norm_out": acc["norm_out"] / N,
            "l2_ratio": acc["ratio"] / N,
            "relative_reconstruction_bias": _ratio(acc["xhat_sq"], acc["x_dot_xhat"]),
            "l0": acc["l0"] / N,
            "l1": acc["l1"] / N,
            **_density_metrics(density, cfg.dense_threshold),
        }
        ce_with_sae = _mean(torch.cat(ce_sae).double())
        kl_with_sae = _mean(torch.cat(kl_sae).double())
        metrics.update({
            "ce_loss_clean": reference.ce_clean,
            "ce_loss_with_sae": ce_with_sae,
            "ce_loss_zero_abl": reference.ce_zero,
            "ce_loss_score": _ratio(reference.ce_zero - ce_with_sae, reference.ce_zero - reference.ce_clean),
            "kl_div_with_sae": kl_with_sae,
            "kl_div_with_ablation": reference.kl_zero,
            "kl_div_score": _ratio(reference.kl_zero - kl_with_sae, reference.kl_zero),
            "n_tokens_total": float(reference.n_tokens_total),
            "n_tokens_scored": float(N),
            "n_positions_ce": float(reference.n_positions_ce),
            "n_positions_kl": float(reference.n_positions_kl),
        })
        es = reference.eval_set
        stats = per_seq.finish()
        per_source = {}
        for src in sorted(set(es.doc_sources[i] for i in es.doc_of_seq)):
            w = np.asarray([es.doc_sources[i] == src for i in es.doc_of_seq], dtype=np.float64)[None]
            per_source[src] = {k: float(v[0]) for k, v in _aggregate(stats, w, saebench).items()}
            per_source[src].update(n_documents=len({int(i) for i in es.doc_of_seq if es.doc_sources[i] == src}),
                                   n_sequences=int(w.sum()), n_tokens_scored=int((w @ stats["n"])[0]))
        ci = _bootstrap_ci(stats, es.doc_of_seq, cfg.n_bootstrap, cfg.seed, saebench)
        metrics.update({f"{k}_ci_{side}": v[j] for k, v in ci.items() for j, side in enumerate(("low", "high"))})
        metrics["n_documents"] = float(es.n_documents)
        metrics["frac_dead_eval"] = metrics["frac_dead"]
        trained_dead = None if saebench else _training_dead_fraction(run_dir)
        if trained_dead is not None:  # the run's own counter (never fired in its last dead_tokens tokens)
            metrics["frac_dead"] = trained_dead
        eval_config = {**asdict(cfg), "model_name": lm.model_id, "hook_name": hook,
                       "llm_dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                       "n_sequences": reference.n_sequences}
        return {
            "eval_type_id": EVAL_TYPE_ID,
            "eval_config": eval_config,
            "metrics": metrics,
            "metric_categories": metric_categories(metrics),
            "details": latent_details(sae, density, (fire / seq_fire).cpu()),
            "unstructured": {
                "run_dir": run_dir, "model_id": lm.model_id, "model_fingerprint": lm.fingerprint,
                "hook_name": hook,
                "dataset": cfg.dataset, "split": cfg.split, "exclude_special": cfg.exclude_special,
                "compat": cfg.compat, "per_source": per_source,
                "frac_dead_source": "training run (metrics.jsonl dead_fraction)" if trained_dead is not None
                else "eval tokens (latents that never fired on them)",
                "confidence_intervals": {"level": 0.95, "method": "percentile bootstrap over documents",
                                         "n_bootstrap": cfg.n_bootstrap, "n_documents": es.n_documents},
                "special_token_ids": lm.special_token_ids if cfg.exclude_special else [],
                "clean_logprobs_cached": reference.extra.get("clean_logprobs_cached"),
            },
        }


class _PerSeq:
    """Per-sequence sums from which any weighted subset of sequences (a source, a bootstrap resample)
    gets its headline metrics exactly as the full set does (:func:`_aggregate`)."""

    def __init__(self, n_seq: int, d: int) -> None:
        z = lambda: torch.zeros(n_seq, dtype=torch.float64)  # noqa: E731
        self.v = {k: z() for k in ("n", "err", "sxx", "ev_tok", "l0", "ce_clean", "ce_sae", "ce_zero", "n_ce",
                                   "kl_sae", "kl_zero", "n_kl")}
        self.sx = torch.zeros(n_seq, d, dtype=torch.float64)

    def add(self, name: str, seq: torch.Tensor, values: torch.Tensor) -> None:
        self.v[name].index_add_(0, seq, values.double())

    def add_tokens(self, seq: torch.Tensor, xs: torch.Tensor, err: torch.Tensor, ev_tok: torch.Tensor) -> None:
        self.add("n", seq, torch.ones(len(seq)))
        self.add("err", seq, err)
        self.add("sxx", seq, (xs * xs).sum(-1))
        self.add("ev_tok", seq, ev_tok)
        self.sx.index_add_(0, seq, xs.double())

    def add_scores(self, lp_seq: torch.Tensor, ce_rows: torch.Tensor, ce_clean: torch.Tensor, ce_sae: torch.Tensor,
                   ce_zero: torch.Tensor, kl_zero: torch.Tensor, kl_sae: torch.Tensor) -> None:
        ce_seq = lp_seq[ce_rows]
        for name, vals in (("ce_clean", ce_clean), ("ce_sae", ce_sae), ("ce_zero", ce_zero)):
            self.add(name, ce_seq, vals)
        self.add("n_ce", ce_seq, torch.ones(len(ce_seq)))
        self.add("kl_zero", lp_seq, kl_zero)
        self.add("kl_sae", lp_seq, kl_sae)
        self.add("n_kl", lp_seq, torch.ones(len(lp_seq)))

    def finish(self) -> dict[str, np.ndarray]:
        return {**{k: v.numpy() for k, v in self.v.items()}, "sx": self.sx.numpy()}


def _aggregate(st: dict[str, np.ndarray], w: np.ndarray, saebench: bool) -> dict[str, np.ndarray]:
    """Headline metrics for sequence weights ``w [B, n_seq]`` (one row per subset/resample)."""
    n = w @ st["n"]
    sx = w @ st["sx"]
    sq_dev = w @ st["sxx"] - (sx * sx).sum(-1) / np.maximum(n, 1)
    err = w @ st["err"]
    cz, cs, cc = w @ st["ce_zero"], w @ st["ce_sae"], w @ st["ce_clean"]
    kz, ks = w @ st["kl_zero"], w @ st["kl_sae"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "explained_variance": (w @ st["ev_tok"]) / n if saebench else 1 - err / sq_dev,
            "l0": (w @ st["l0"]) / n,
            "mse": err / n if saebench else err / (n * st["sx"].shape[1]),
            "ce_loss_score": (cz - cs) / (cz - cc),
            "kl_div_score": (kz - ks) / kz,
        }


def _bootstrap_ci(st: dict[str, np.ndarray], doc_of_seq: np.ndarray, n_boot: int, seed: int, saebench: bool
                  ) -> dict[str, tuple[float, float]]:
    """95 % percentile-bootstrap intervals, resampling *documents* with replacement (their sequences
    move together: tokens of one document are not independent)."""
    if n_boot <= 0:
        return {}
    docs, local = np.unique(doc_of_seq, return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(docs), len(docs)), minlength=len(docs))
                       for _ in range(n_boot)]).astype(np.float64)
    vals = _aggregate(st, counts[:, local], saebench)
    return {k: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))) for k, v in vals.items()}


def _training_dead_fraction(run_dir: str | None) -> float | None:
    """The run's last logged ``dead_fraction`` (its dead-latent counter), or None without one."""
    from ..rundir.metrics import last_value, read_metrics

    return last_value(read_metrics(run_dir), "dead_fraction") if run_dir else None


def _density_metrics(density: torch.Tensor, dense_threshold: float) -> dict[str, float]:
    """Dead/dense fractions from firing rates ``density [d_sae]`` (SAEBench ``calculate_misc_metrics``)."""
    total = float(density.sum())

    def share_above(t: float) -> float:
        return float(density[density > t].sum()) / total if total > 0 else 0.0

    return {
        "frac_dead": float((density == 0).double().mean()),
        "frac_alive": float((density > 0).double().mean()),
        "frac_dense": float((density > dense_threshold).double().mean()),
        "freq_over_1_percent": float((density > 0.01).double().mean()),
        "freq_over_10_percent": float((density > 0.1).double().mean()),
        "normalized_freq_over_1_percent": share_above(0.01),
        "normalized_freq_over_10_percent": share_above(0.1),
    }


def latent_details(sae: SAE, density: torch.Tensor, cah: torch.Tensor) -> list[dict]:
    """One dict per latent (SAEBench ``CoreFeatureMetric`` fields that need no pairwise work).

    ``density [d_sae]`` firing rate; ``cah [d_sae]`` consistent-activation heuristic = firings per
    sequence in which the latent fires at least once (None when it never fires);
    ``encoder_norm`` = ‖W_enc[:, i]‖, ``encoder_decoder_cosine_sim`` = cos(W_enc[:, i], W_dec[i]).
    """
    w_enc = sae.W_enc.detach().float().cpu()
    w_dec = sae.W_dec.detach().float().cpu()
    enc_norm = w_enc.norm(dim=0)
    cos = F.cosine_similarity(w_enc.T, w_dec, dim=-1)
    bias = sae.b_enc.detach().float().cpu()
    return [
        {"index": i, "feature_density": float(density[i]),
         "consistent_activation_heuristic": float(cah[i]) if math.isfinite(float(cah[i])) else None,
         "encoder_norm": float(enc_norm[i]), "encoder_bias": float(bias[i]),
         "encoder_decoder_cosine_sim": float(cos[i])}
        for i in range(len(density))
    ]


def metric_categories(m: dict[str, float]) -> dict[str, dict[str, float]]:
    """Flat core metrics → SAEBench's ``eval_result_metrics`` groups (names of SAEBench core's output)."""
    return {
        "model_behavior_preservation": {k: m[k] for k in ("kl_div_score", "kl_div_with_ablation",
                                                          "kl_div_with_sae")},
        "model_performance_preservation": {
            "ce_loss_score": m["ce_loss_score"], "ce_loss_with_ablation": m["ce_loss_zero_abl"],
            "ce_loss_with_sae": m["ce_loss_with_sae"], "ce_loss_without_sae": m["ce_loss_clean"]},
        "reconstruction_quality": {k: m[k] for k in ("explained_variance", "mse", "cossim", "explained_variance_ratio",
                                                      "explained_variance_legacy")},
        "shrinkage": {k: m[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio",
                                        "relative_reconstruction_bias")},
        "sparsity": {k: m[k] for k in ("l0", "l1")},
        "confidence_intervals": {k: v for k, v in m.items() if k.endswith(("_ci_low", "_ci_high"))},
        "misc_metrics": {k: m[k] for k in ("frac_dead", "frac_dead_eval", "frac_alive", "frac_dense",
                                           "freq_over_1_percent",
                                           "freq_over_10_percent", "normalized_freq_over_1_percent",
                                           "normalized_freq_over_10_percent")},
        "token_stats": {"total_tokens_eval_reconstruction": int(m["n_tokens_total"]),
                        "total_tokens_eval_sparsity_variance": int(m["n_tokens_total"]),
                        "n_tokens_scored": int(m["n_tokens_scored"]),
                        "n_positions_ce": int(m["n_positions_ce"]), "n_positions_kl": int(m["n_positions_kl"]),
                        "n_documents": int(m["n_documents"])},
    }
