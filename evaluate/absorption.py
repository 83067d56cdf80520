"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption"; SAEBench
``absorption_first_letter``).

Data. *Words* are the tokenizer's alphabetic tokens: a single token whose text, after at most one
leading space, is ≥ ``min_word_len`` ASCII letters (SAEBench ``get_alpha_tokens`` keeps length 1 too).
Their label is the first letter (lower-cased). ``max_words = 0`` (default) keeps the whole vocabulary
(SAEBench); ``max_words > 0`` draws at most ``max_words // 26`` words per letter (seeded, a CPU budget
that keeps every letter some held-out words). Each letter's words are split into train
(``train_fraction``, SAEBench 0.8) and held-out words. Each word gets an in-context prompt (SAEBench
``create_icl_prompt``)::

    <bos>{ex_1} has the first letter: E\\n{ex_2} has the first letter: X\\n...{word} has the first letter:

with ``max_icl_examples`` examples drawn from the same split, never the word itself. SAEBench draws them
per prompt (``words_per_prefix = 1``); with ``words_per_prefix = g > 1`` the words of a split are
shuffled into groups of ``g`` that share one draw, so the shared prefix runs once through the model (KV
cache) and each word costs one token: every prompt's examples are still a uniform draw from its split,
only their reuse across a group differs (:func:`icl_groups`). The defaults are SAEBench's strength (the
whole alphabetic vocabulary, 10 examples) with groups of 64: on Gemma 3 270M, 139 429 words in 5.3 min
on 2 CPU cores instead of about 1.5 h for per-prompt draws. The model activation ``x [d_model]`` is read
at the hook at the position of the word token (SAEBench's ``prompt_token_pos = -6``). The prompt is
assembled from token ids (the word is exactly its own token) and cut right after the word token:
activations are causal, so the tokens after the word (`` has the first letter:``) cannot change ``x``.

Algorithm (:func:`compute_absorption`, on activation matrices; :func:`run` computes them):

1. Ground-truth probes (SAEBench ``train_linear_probe_for_task``): one-vs-rest logistic regression per
   letter on the train words' ``x`` (:func:`fit_logistic`: class-balanced BCE ≙ SAEBench's
   ``pos_weight``, L2 with ``C = probe_c``, full-batch L-BFGS instead of SAEBench's 50 Adam epochs)
   on centred, isotropically rescaled activations, mapped back to a raw-space direction ``w_L`` and
   bias. ``F1_L`` = F1 of ``score_L(x) > 0`` on the held-out words. Letters with
   ``F1_L < min_gt_probe_f1`` (0.6, SAEBench ``min_GT_probe_f1``) are dropped; so are letters with
   fewer than 2 train or no held-out words.
2. k-sparse probing (SAEBench ``train_k_sparse_probes``): latents ranked by the class-mean difference
   ``mean(f | letter L) − mean(f | other)`` of the SAE codes ``f = sae.encode(x)`` on train words
   (SAEBench ranks by the weights of an L1-regularised probe on ``f``; class-mean difference is
   SAEBench's sparse-probing selection). For ``k = 1..max_k_value`` a scikit-learn
   ``LogisticRegression(class_weight="balanced")`` (as SAEBench; here on standardised latents) on the
   top-``k`` latents gives a held-out ``F1_k``. Feature splitting (SAEBench
   ``add_feature_splits_to_metrics_df``): ``k`` grows while ``F1_k > best + f1_jump_threshold``
   (τ_fs = 0.03); the last accepted ``k`` is ``num_split_features`` and its ``k`` latents are the
   letter's *main latents* ``M``.
3. Absorption per held-out word of letter ``L`` that the ground-truth probe detects
   (``score_L(x) > 0``, the "probe true positives"; SAEBench ``FeatureAbsorptionCalculator``), with
   ``u = w_L / ‖w_L‖``:

   * ``a = x · u`` (model activation's probe projection; no bias or mean subtracted, as SAEBench);
   * ``p_i = f_i · (W_dec[i] · u)`` (latent i's contribution; SAEBench's ``activation · cos`` after
     ``fold_W_dec_norm``), ``cos_i = cos(W_dec[i], u)``;
   * ``m = Σ_{i∈M} p_i``; absorbers = latents ``i ∉ M`` with ``cos_i ≥ 0.1`` and ``p_i > 0``;
     ``S`` = sum of their ``absorption_fraction_max_absorbing_latents`` (3) largest ``p_i``;
   * absorption fraction = 0 if ``a ≤ 0`` or ``m ≥ a`` or ``S / a < 0.4``; else 1 if ``m ≤ 0``; else
     ``A / (A + m)`` with ``A = min(S, a − m)``, clipped to [0, 1];
   * full absorption: every main latent silent (``f_i < 1e-8``), the latent with the largest ``p_i``
     has ``cos ≥ 0.025``, ``a > 0`` and that ``p_i / a ≥ 0.4``.

Metrics (SAEBench ``eval_result_metrics["mean"]``), over the evaluated letters (probe F1 ≥ 0.6):

* ``mean_absorption_fraction_score`` = mean over letters of (Σ absorption fractions / #probe true
  positives of the letter);
* ``mean_full_absorption_score`` = mean over letters of (#full absorptions / #probe true positives);
* ``mean_num_split_features`` = mean over letters of the chosen ``k``;
* ``std_dev_*`` of the three, ``n_letters_evaluated``, ``n_letters_probed`` (probes fitted),
  ``mean_gt_probe_f1`` and word counts. SAEBench refuses to score a model with fewer than 20 letters
  passing the probe filter (``min_feats_for_eval``); we score anyway and record
  ``enough_letters = n_letters_evaluated ≥ min_letters_for_eval`` in ``eval_result_unstructured``.
  Small models (Gemma 3 270M) know first letters poorly, so fewer letters pass.

The word activations and the ground-truth probes do not depend on the SAE: they are computed once
per model/hook through ``ctx.cached``.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..model import LoadedModel, capture_resid_post, capture_resid_post_shared_prefix
from ..progress import progress_bar
from ..rundir.sae import SAE
from .common import right_pad
from .registry import EvalContext, EvalOutput

EVAL_TYPE_ID = "absorption"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
EPS = 1e-8


@dataclass
class Config:
    """Settings (defaults = SAEBench ``AbsorptionEvalConfig`` / ``FeatureAbsorptionCalculator`` where
    they exist; ``words_per_prefix`` and ``ranking`` are ours, see their notes)."""

    prompt_template: str = "{word} has the first letter:"
    example_separator: str = "\n"
    max_icl_examples: int = 10
    max_words: int = 0
    """0: every alphabetic token (SAEBench); > 0: at most ``max_words // 26`` per letter."""
    min_word_len: int = 2
    word_start_only: bool = False
    train_fraction: float = 0.8
    probe_c: float = 1.0
    min_gt_probe_f1: float = 0.6
    min_letters_for_eval: int = 20
    max_k_value: int = 10
    f1_jump_threshold: float = 0.03
    full_absorption_probe_cos_threshold: float = 0.025
    absorption_fraction_probe_cos_threshold: float = 0.1
    probe_projection_proportion_threshold: float = 0.4
    absorption_fraction_max_absorbing_latents: int = 3
    llm_batch_size: int = 64
    seed: int = 42
    words_per_prefix: int = 64
    """Words that share one draw of ICL examples (1: every prompt its own draw, as SAEBench). With
    ``g > 1`` the shared prefix runs once per group (KV cache), so the LM pass costs about
    ``n_words · (1 + prompt_len / g)`` tokens instead of ``n_words · prompt_len``: full strength
    (all ~139k words, 10 examples, 82-token prompts) takes minutes instead of ~1.5 h on 2 CPU cores."""
    ranking: str = "mean_diff"
    """How main-latent candidates are ranked: ``mean_diff`` (class-mean difference of the codes) or
    ``l1_probe`` (SAEBench: an L1-regularised one-vs-rest logistic probe on the codes, ranked by its
    signed weights; here solved to convergence by liblinear, SAEBench takes 50 Adam epochs)."""
    l1_decay: float = 0.01
    """``l1_probe``: SAEBench's ``k_sparse_probe_l1_decay`` (mean BCE + l1_decay · Σ|w|)."""
    n_bootstrap: int = 1000
    """Bootstrap resamples (held-out words within each letter) for the 95 % intervals (0: none)."""
    ranges = {"max_icl_examples": ">=0", "max_words": ">=0", "min_word_len": ">=1", "train_fraction": "(0,1)",
              "probe_c": ">0", "min_gt_probe_f1": "[0,1]", "min_letters_for_eval": ">=1", "max_k_value": ">=1",
              "f1_jump_threshold": ">=0", "full_absorption_probe_cos_threshold": "[0,1]",
              "absorption_fraction_probe_cos_threshold": "[0,1]", "probe_projection_proportion_threshold": "[0,1]",
              "absorption_fraction_max_absorbing_latents": ">=1", "llm_batch_size": ">=1", "seed": ">=0",
              "words_per_prefix": ">=1", "ranking": "{mean_diff,l1_probe}", "l1_decay": ">=0", "n_bootstrap": ">=0"}
    """Allowed values of each setting (``params.check_range`` specs), enforced for ``-p``."""

    def __post_init__(self) -> None:
        if self.ranking not in ("mean_diff", "l1_probe"):
            raise ValueError(f"ranking {self.ranking!r}: choose mean_diff or l1_probe")
        for name in ("words_per_prefix", "llm_batch_size", "max_k_value"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.max_icl_examples < 0:
            raise ValueError(f"max_icl_examples = {self.max_icl_examples}: must be >= 0")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"train_fraction = {self.train_fraction}: must be in (0, 1)")


# -- ground-truth probes --------------------------------------------------------------------------
@dataclass
class GroundTruthProbes:
    """One-vs-rest letter probes on model activations.

    ``weights [26, d]`` raw-space directions ``w_L`` (zero for letters without a probe), ``bias [26]``;
    ``f1``: held-out F1 per letter (None: too few words to fit or score); ``test_scores [n_test, 26]``
    ``x·w_L + b_L`` on the held-out words (−inf for letters without a probe).
    """

    weights: torch.Tensor
    bias: torch.Tensor
    f1: list[float | None]
    test_scores: torch.Tensor


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and std of ``x [n, d]`` (std < 1e-8 → 1)."""
    mu = x.mean(0)
    sd = x.std(0, correction=0)
    return mu, torch.where(sd < 1e-8, torch.ones_like(sd), sd)


def fit_logistic(z: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 500,
                 on_eval: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``P`` independent class-balanced L2 logistic regressions on the same inputs, fitted jointly.

    ``z [n, d]`` inputs, ``y [n, P]`` bool targets → ``(W [d, P], b [P])`` (float64) minimising, per
    column, ``c · Σ_i s_i · BCE(z_i·w + b, y_i) + ½‖w‖²`` with balanced sample weights
    ``s_i = n / (2·n_pos)`` for positives and ``n / (2·n_neg)`` for negatives (scikit-learn's
    ``LogisticRegression(C=c, class_weight="balanced")`` objective; SAEBench's probes use BCE with
    ``pos_weight = n_neg / n_pos``, the same up to a constant factor). Full-batch L-BFGS (strong Wolfe).
    ``on_eval`` is called after each loss evaluation (progress).
    """
    z = z.double()
    yd = y.double()
    n = z.shape[0]
    n_pos = yd.sum(0)
    weights = yd * (n / (2 * n_pos.clamp_min(1))) + (1 - yd) * (n / (2 * (n - n_pos).clamp_min(1)))
    w = torch.zeros(z.shape[1], yd.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(yd.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-8, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, yd, reduction="none")
        loss = c * (weights * bce).sum() + 0.5 * (w * w).sum()
        loss.backward()
        if on_eval is not None:
            on_eval()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _f1(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """F1 of boolean predictions ``[n]`` (0 when there is no true or predicted positive)."""
    tp = float((y_true & y_pred).sum())
    denom = float(y_true.sum() + y_pred.sum())
    return 2 * tp / denom if denom > 0 else 0.0


def train_ground_truth_probes(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                              y_test: torch.Tensor, c: float = 1.0, quiet: bool = True) -> GroundTruthProbes:
    """Fit a one-vs-rest probe per letter on ``x_train [n, d]`` (labels ``y_train [n]`` in 0..25) and
    score it on ``x_test [m, d]`` / ``y_test [m]`` (step 1 of the module doc).

    A probe is fitted only for letters with ≥ 2 train words, ≥ 1 train word of another letter and
    ≥ 1 held-out word. Inputs are centred and divided by one scalar σ (RMS per dimension of the train
    words: an isotropic rescaling, so the L2 penalty keeps the raw geometry of SAEBench's probe on raw
    activations); a fit ``z·c + b`` maps back to ``w = c / σ``, ``b_raw = b − c·μ / σ``. Unless
    ``quiet``, a progress bar counts the L-BFGS loss evaluations (minutes at SAEBench strength on a CPU).
    """
    xtr, xte = x_train.double().cpu(), x_test.double().cpu()
    ytr, yte = y_train.cpu(), y_test.cpu()
    d = xtr.shape[1]
    mu = xtr.mean(0)
    sigma = max(float(((xtr - mu) ** 2).sum(1).mean() / d) ** 0.5, 1e-8)
    letters = torch.arange(26)
    pos_tr = ytr[:, None] == letters                                  # [n, 26]
    fit_ok = (pos_tr.sum(0) >= 2) & ((~pos_tr).sum(0) >= 1) & ((yte[:, None] == letters).sum(0) >= 1)
    weights = torch.zeros(26, d, dtype=torch.float64)
    bias = torch.zeros(26, dtype=torch.float64)
    cols = torch.nonzero(fit_ok).flatten()
    if len(cols):
        with progress_bar(quiet, unit="eval") as bar:
            task = bar.add_task(f"absorption: fitting {len(cols)} letter probes (L-BFGS)", total=500)
            coef, icpt = fit_logistic((xtr - mu) / sigma, pos_tr[:, cols], c,
                                      on_eval=lambda: bar.update(task, advance=1))
        weights[cols] = (coef / sigma).T
        bias[cols] = icpt - (mu / sigma) @ coef
    scores = torch.full((len(xte), 26), -math.inf, dtype=torch.float64)
    scores[:, cols] = xte @ weights[cols].T + bias[cols]
    f1: list[float | None] = [None] * 26
    for L in cols.tolist():
        f1[L] = _f1(yte == L, scores[:, L] > 0)
    return GroundTruthProbes(weights.float(), bias.float(), f1, scores.float())


# -- k-sparse probing and feature splitting -------------------------------------------------------
@dataclass
class KSparseResult:
    """``ranked [max_k]`` latents by class-mean difference; ``f1_by_k[k-1]`` held-out F1 of the top-k
    probe; ``k`` the chosen number of split features (main latents = ``ranked[:k]``)."""

    ranked: list[int]
    f1_by_k: list[float]
    k: int

    @property
    def main_latents(self) -> list[int]:
        return self.ranked[: self.k]


def sparse_codes(f: torch.Tensor) -> object:
    """``f [n, d_sae]`` as a float64 ``scipy.sparse.csr_matrix`` (TopK codes: ``k`` nonzeros per row),
    the input :func:`rank_latents` fits the L1 probe on (a dense float64 copy of 111k × 5120 codes
    would be 4.6 GB)."""
    import scipy.sparse

    f = f.detach().cpu()
    rows, cols = torch.nonzero(f, as_tuple=True)
    return scipy.sparse.csr_matrix((f[rows, cols].double().numpy(), (rows.numpy(), cols.numpy())),
                                   shape=tuple(f.shape))


def rank_latents(f_train: torch.Tensor, pos_train: torch.Tensor, max_k: int, ranking: str = "mean_diff",
                 l1_decay: float = 0.01, f_train_sparse: object | None = None) -> list[int]:
    """The ``max_k`` best main-latent candidates for one letter (see :attr:`Config.ranking`).

    ``l1_probe`` minimises mean BCE + ``l1_decay``·Σ|w| (SAEBench ``train_sparse_multi_probe``), i.e.
    scikit-learn's L1 logistic regression with ``C = 1 / (l1_decay · n)``, and ranks by the weights
    (largest positive first: latents that predict the letter, as SAEBench's ``topk``).
    ``f_train_sparse``: :func:`sparse_codes` of ``f_train``, built once per SAE by the caller (else here);
    both rankings read it (``mean_diff``: float64 class means from its sums).
    """
    pos = pos_train.bool()
    k = min(max_k, f_train.shape[1])
    if ranking not in ("mean_diff", "l1_probe"):
        raise ValueError(f"ranking {ranking!r}: choose mean_diff or l1_probe")
    x = sparse_codes(f_train) if f_train_sparse is None else f_train_sparse
    if ranking == "mean_diff":  # float64 class sums from the sparse codes (no dense float64 copy)
        pos_np = pos.cpu().numpy()
        total = np.asarray(x.sum(0)).ravel()  # type: ignore[attr-defined]
        pos_sum = np.asarray(x[pos_np].sum(0)).ravel()  # type: ignore[index]
        n_pos, n_neg = int(pos_np.sum()), int((~pos_np).sum())
        diff = pos_sum / max(n_pos, 1) - (total - pos_sum) / max(n_neg, 1)
        return torch.argsort(-torch.from_numpy(diff), stable=True)[:k].tolist()
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major_minor = tuple(int(p) for p in sklearn.__version__.split(".")[:2])
    l1 = {"l1_ratio": 1.0} if major_minor >= (1, 8) else {"penalty": "l1"}  # `penalty` is deprecated in 1.8
    clf = LogisticRegression(solver="liblinear", C=1.0 / (l1_decay * f_train.shape[0]), max_iter=1000, **l1)
    clf.fit(x, pos.cpu().numpy())  # type: ignore[arg-type]
    return torch.argsort(-torch.from_numpy(clf.coef_[0]), stable=True)[:k].tolist()


def k_sparse_probe(f_train: torch.Tensor, pos_train: torch.Tensor, f_test: torch.Tensor, pos_test: torch.Tensor,
                   max_k: int = 10, f1_jump_threshold: float = 0.03, ranking: str = "mean_diff",
                   l1_decay: float = 0.01, f_train_sparse: object | None = None) -> KSparseResult:
    """Step 2 of the module doc for one letter.

    ``f_train [n, d_sae]``, ``f_test [m, d_sae]``: SAE codes; ``pos_* [n] / [m]`` bool: word has the letter.
    Ranking: ``mean(f_train[pos]) − mean(f_train[~pos])``, descending (stable); ``F1_k`` of a balanced
    logistic regression on the top-k latents (standardised), predicting ``decision > 0`` on ``f_test``.
    ``k`` = last ``k`` of the run ``F1_k > best + f1_jump_threshold`` (SAEBench feature splitting).
    """
    pos_tr = pos_train.bool()
    ranked = rank_latents(f_train, pos_tr, max_k, ranking, l1_decay, f_train_sparse)
    from sklearn.linear_model import LogisticRegression

    ytr = pos_tr.cpu().numpy()
    yte = pos_test.bool().cpu()
    f1s = []
    top_tr, top_te = f_train[:, ranked].double().cpu(), f_test[:, ranked].double().cpu()
    for k in range(1, len(ranked) + 1):
        xtr, xte = top_tr[:, :k], top_te[:, :k]
        mu, sd = _standardise(xtr)
        clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)
        clf.fit(((xtr - mu) / sd).numpy(), ytr)
        f1s.append(_f1(yte, torch.from_numpy(clf.decision_function(((xte - mu) / sd).numpy())) > 0))
    best, chosen = -math.inf, 0
    for k, score in enumerate(f1s, 1):
        if score > best + f1_jump_threshold:
            best, chosen = score, k
        else:
            break
    return KSparseResult(ranked, f1s, chosen)


# -- absorption per word --------------------------------------------------------------------------
@dataclass
class WordAbsorption:
    """Per-word results: ``fraction [n]`` absorption fraction, ``full [n]`` bool full absorption,
    ``top_latent [n]`` latent with the largest probe projection, ``probe_projection [n]`` = ``a``."""

    fraction: torch.Tensor
    full: torch.Tensor
    top_latent: torch.Tensor
    probe_projection: torch.Tensor


def word_absorption(x: torch.Tensor, f: torch.Tensor, w_dec: torch.Tensor, direction: torch.Tensor,
                    main_latents: Sequence[int], cfg: Config) -> WordAbsorption:
    """Step 3 of the module doc (SAEBench ``FeatureAbsorptionCalculator.calculate_absorption``).

    ``x [n, d]`` model activations of probe-detected words, ``f [n, d_sae]`` their SAE codes,
    ``w_dec [d_sae, d]``, ``direction [d]`` the letter's probe direction (any norm), ``main_latents``
    the letter's k-sparse latents.
    """
    x, f, w_dec = x.double(), f.double(), w_dec.double()
    u = direction.double() / direction.double().norm().clamp_min(1e-12)
    dec_proj = w_dec @ u                                          # [d_sae] W_dec[i]·u
    cos = dec_proj / w_dec.norm(dim=1).clamp_min(1e-12)           # [d_sae]
    p = f * dec_proj                                              # [n, d_sae] probe projection per latent
    a = x @ u                                                     # [n]
    main = torch.as_tensor(list(main_latents), dtype=torch.long)
    is_main = torch.zeros(w_dec.shape[0], dtype=torch.bool)
    is_main[main] = True
    m = p[:, main].sum(1)
    absorber = (~is_main)[None, :] & (cos >= cfg.absorption_fraction_probe_cos_threshold)[None, :] & (p > 0)
    n_abs = min(cfg.absorption_fraction_max_absorbing_latents, p.shape[1])
    s = torch.where(absorber, p, torch.zeros_like(p)).topk(n_abs, dim=1).values.sum(1)
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    absorbed = torch.minimum(s, a - m)
    partial = (absorbed / (absorbed + m).clamp_min(1e-300)).clamp(0.0, 1.0)
    frac = torch.where(m <= 0, torch.ones_like(a), partial)
    frac = torch.where((a <= 0) | (m >= a) | (s / safe_a < cfg.probe_projection_proportion_threshold),
                       torch.zeros_like(a), frac)
    top = p.argmax(dim=1)
    top_p = p.gather(1, top[:, None])[:, 0]
    silent = (f[:, main] < EPS).all(dim=1)
    full = (silent & (cos[top] >= cfg.full_absorption_probe_cos_threshold) & (a > 0)
            & (top_p / safe_a >= cfg.probe_projection_proportion_threshold))
    return WordAbsorption(frac.float(), full, top, a.float())


# -- the whole computation on activation matrices -------------------------------------------------
@dataclass
class AbsorptionResult:
    """``metrics`` (the ``mean`` category), ``letters`` (one detail dict per letter with a probe)."""

    metrics: dict[str, float | int | None]
    letters: list[dict] = field(default_factory=list)


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else math.nan


def _stdev(xs: list[float]) -> float:
    return float(statistics.stdev(xs)) if len(xs) > 1 else math.nan


def compute_absorption(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                       f_train: torch.Tensor, f_test: torch.Tensor, w_dec: torch.Tensor, cfg: Config,
                       probes: GroundTruthProbes | None = None,
                       test_words: Sequence[str] | None = None) -> AbsorptionResult:
    """Steps 1–3 of the module doc and the aggregate metrics.

    ``x_* [n, d]`` model activations at the word token, ``y_* [n]`` first-letter indices (0..25),
    ``f_* [n, d_sae]`` SAE codes of the same rows, ``w_dec [d_sae, d]``. ``probes``: precomputed
    ground-truth probes (else fitted here); ``test_words``: held-out word strings (for examples in
    the details).
    """
    if probes is None:
        probes = train_ground_truth_probes(x_train, y_train, x_test, y_test, cfg.probe_c)
    letters: list[dict] = []
    fracs, fulls, splits = [], [], []
    per_word: list[tuple[np.ndarray, np.ndarray]] = []  # per evaluated letter: its true positives' values
    f_sparse = sparse_codes(f_train)  # once per SAE: both rankings read it
    for L in range(26):
        f1 = probes.f1[L]
        if f1 is None:
            continue
        row: dict = {"first_letter": LETTERS[L], "gt_probe_f1": f1,
                     "n_train_words": int((y_train == L).sum()), "n_test_words": int((y_test == L).sum()),
                     "evaluated": f1 >= cfg.min_gt_probe_f1}
        letters.append(row)
        if not row["evaluated"]:
            continue
        ks = k_sparse_probe(f_train, y_train == L, f_test, y_test == L, cfg.max_k_value, cfg.f1_jump_threshold,
                            cfg.ranking, cfg.l1_decay, f_sparse)
        detected = (y_test == L) & (probes.test_scores[:, L] > 0)
        idx = torch.nonzero(detected).flatten()
        n_tp = len(idx)
        wa = word_absorption(x_test[idx], f_test[idx], w_dec, probes.weights[L], ks.main_latents, cfg)
        frac = float(wa.fraction.double().sum()) / n_tp if n_tp else math.nan
        full_rate = float(wa.full.double().sum()) / n_tp if n_tp else math.nan
        row.update({
            "mean_absorption_fraction": frac, "full_absorption_rate": full_rate,
            "num_full_absorption": int(wa.full.sum()), "num_probe_true_positives": n_tp,
            "num_split_features": ks.k, "split_feats": ks.main_latents, "k_sparse_f1": ks.f1_by_k,
        })
        if test_words is not None:
            absorbed = [i for i in range(n_tp) if float(wa.fraction[i]) > 0]
            row["absorbed_examples"] = [
                {"word": test_words[int(idx[i])], "absorption_fraction": float(wa.fraction[i]),
                 "full": bool(wa.full[i]), "top_latent": int(wa.top_latent[i])} for i in absorbed[:10]]
        if n_tp:
            fracs.append(frac)
            fulls.append(full_rate)
            splits.append(float(ks.k))
            per_word.append((wa.fraction.double().numpy(), wa.full.double().numpy()))
    probed = [r["gt_probe_f1"] for r in letters]
    metrics: dict[str, float | int | None] = {
        "mean_absorption_fraction_score": _mean(fracs),
        "mean_full_absorption_score": _mean(fulls),
        "mean_num_split_features": _mean(splits),
        # SAEBench counts the split features beyond the first (``len(split_feats) - 1``)
        "mean_num_split_features_saebench": _mean([k - 1 for k in splits]),
        "std_dev_absorption_fraction_score": _stdev(fracs),
        "std_dev_full_absorption_score": _stdev(fulls),
        "std_dev_num_split_features": _stdev(splits),
        "n_letters_evaluated": len(fracs),
        "n_letters_probed": len(probed),
        "mean_gt_probe_f1": _mean(probed),
        "n_words_train": int(len(y_train)),
        "n_words_test": int(len(y_test)),
    }
    metrics.update(_word_bootstrap(per_word, cfg.n_bootstrap, cfg.seed))
    return AbsorptionResult(metrics, letters)


def _word_bootstrap(per_word: list[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int) -> dict[str, float]:
    """95 % percentile-bootstrap intervals of the two letter-mean scores, resampling each evaluated
    letter's held-out true-positive words with replacement (letters fixed)."""
    if n_boot <= 0 or not per_word:
        return {}
    rng = np.random.default_rng(seed)
    frac_b, full_b = np.zeros(n_boot), np.zeros(n_boot)
    for fr, fu in per_word:
        pick = rng.integers(0, len(fr), (n_boot, len(fr)))
        frac_b += fr[pick].mean(1)
        full_b += fu[pick].mean(1)
    frac_b /= len(per_word)
    full_b /= len(per_word)
    return {"mean_absorption_fraction_score_ci_low": float(np.percentile(frac_b, 2.5)),
            "mean_absorption_fraction_score_ci_high": float(np.percentile(frac_b, 97.5)),
            "mean_full_absorption_score_ci_low": float(np.percentile(full_b, 2.5)),
            "mean_full_absorption_score_ci_high": float(np.percentile(full_b, 97.5))}


# -- words, prompts and model activations ---------------------------------------------------------
def alphabetic_words(tokenizer: object, min_len: int = 2, word_start_only: bool = False) -> list[tuple[int, str]]:
    """``(token id, text)`` of every non-special token whose text is at most one leading space plus
    ≥ ``min_len`` ASCII letters (``word_start_only``: the leading space is required), sorted by id."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for tok, i in tokenizer.get_vocab().items():  # type: ignore[attr-defined]
        if i in special:
            continue
        marked = tok[:1] in ("▁", "Ġ", " ")
        core = tok[1:] if marked else tok
        if len(core) < min_len or not core.isascii() or not core.isalpha():
            continue
        text = tokenizer.convert_tokens_to_string([tok])  # type: ignore[attr-defined]
        body = text[1:] if text.startswith(" ") else text
        if len(body) < min_len or not body.isascii() or not body.isalpha():
            continue
        if word_start_only and not text.startswith(" "):
            continue
        out.append((int(i), text))
    return sorted(out)


def sample_words(words: Sequence[tuple[int, str]], max_words: int, train_fraction: float, seed: int
                 ) -> tuple[list[tuple[int, str]], list[bool]]:
    """At most ``max_words // 26`` words per first letter (seeded sample), each letter's words split
    into train (``round(n·train_fraction)``, at least 1 and, for n ≥ 2, at most n − 1) and held-out.
    Returns (words, is_train) in a letter-major order."""
    rng = random.Random(seed)
    per_letter = max(max_words // 26, 1) if max_words > 0 else None  # ≤ 0: the whole vocabulary (SAEBench)
    by_letter: dict[str, list[tuple[int, str]]] = {c: [] for c in LETTERS}
    for i, w in words:
        by_letter[w.strip()[0].lower()].append((i, w))
    chosen: list[tuple[int, str]] = []
    is_train: list[bool] = []
    for c in LETTERS:
        ws = by_letter[c]
        ws = rng.sample(ws, len(ws) if per_letter is None else min(per_letter, len(ws)))
        n_train = min(max(round(len(ws) * train_fraction), 1), max(len(ws) - 1, 1))
        chosen += ws
        is_train += [j < n_train for j in range(len(ws))]
    return chosen, is_train


def _encode(tokenizer: object, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []  # type: ignore[operator]


def build_prefix(tokenizer: object, bos_id: int, examples: Sequence[tuple[int, str]], cfg: Config
                 ) -> tuple[list[int], list[str]]:
    """Token ids ``[BOS, ICL examples..., template text before {word}]`` (everything a prompt has before
    its word token) and the examples' display texts."""
    pre, _, post = cfg.prompt_template.partition("{word}")
    pre_ids, post_ids, sep_ids = _encode(tokenizer, pre), _encode(tokenizer, post), _encode(tokenizer,
                                                                                           cfg.example_separator)
    ids = [bos_id]
    parts = []
    for tid, text in examples:
        answer = " " + text.strip()[0].upper()
        ids += pre_ids + [tid] + post_ids + _encode(tokenizer, answer) + sep_ids
        parts.append(cfg.prompt_template.format(word=text) + answer)
    return ids + pre_ids, parts


def build_prompt(tokenizer: object, bos_id: int, word: tuple[int, str], examples: Sequence[tuple[int, str]],
                 cfg: Config) -> tuple[list[int], str]:
    """Token ids ``[BOS, ICL examples..., template prefix, word]`` (ending at the word token) and the
    full prompt text (with the template suffix) for display."""
    ids, parts = build_prefix(tokenizer, bos_id, examples, cfg)
    return ids + [word[0]], cfg.example_separator.join([*parts, cfg.prompt_template.format(word=word[1])])


@dataclass
class WordActivations:
    """``acts [n, d_model]`` (float32, CPU) at the word token; ``letters [n]`` (0..25); ``is_train [n]``."""

    token_ids: list[int]
    words: list[str]
    letters: torch.Tensor
    is_train: torch.Tensor
    acts: torch.Tensor
    example_prompts: list[str]


@torch.no_grad()
def word_activations(lm: LoadedModel, layer: int, cfg: Config, quiet: bool = True) -> WordActivations:
    """Sample words, build their ICL prompts (seeded) and read the activation at the word token.

    ``words_per_prefix == 1``: every prompt draws its own examples (SAEBench); the prompts run in
    padded batches. ``> 1``: each split's words are shuffled into groups of that size and a group
    shares one draw of examples (from the split, none of them a word of the group): the shared prefix
    runs once and only the word tokens run per word (:func:`capture_resid_post_shared_prefix`). Each
    prompt's examples are still a uniform draw; only their reuse across a group's words differs.
    """
    tok = lm.tokenizer
    vocab = alphabetic_words(tok, cfg.min_word_len, cfg.word_start_only)
    words, is_train = sample_words(vocab, cfg.max_words, cfg.train_fraction, cfg.seed)
    rng = random.Random(cfg.seed + 1)
    pools = {True: [w for w, t in zip(words, is_train, strict=True) if t],
             False: [w for w, t in zip(words, is_train, strict=True) if not t]}
    acts = torch.zeros(len(words), lm.d_model)
    with progress_bar(quiet, unit="word") as bar:
        task = bar.add_task("absorption: word activations", total=len(words))
        fill = _shared_prefix_activations if cfg.words_per_prefix > 1 else _own_prompt_activations
        texts = fill(lm, layer, cfg, words, is_train, pools, rng, acts, lambda n: bar.advance(task, n))
    letters = torch.tensor([LETTERS.index(w.strip()[0].lower()) for _, w in words], dtype=torch.long)
    return WordActivations([i for i, _ in words], [w for _, w in words], letters,
                           torch.tensor(is_train, dtype=torch.bool), acts, texts[:3])


def _own_prompt_activations(lm: LoadedModel, layer: int, cfg: Config, words: list[tuple[int, str]],
                            is_train: list[bool], pools: dict[bool, list[tuple[int, str]]], rng: random.Random,
                            acts: torch.Tensor, advance: Callable[[int], None]) -> list[str]:
    """One example draw per word, padded batches of whole prompts; fills ``acts``, returns prompt texts."""
    tok = lm.tokenizer
    prompts: list[list[int]] = []
    texts: list[str] = []
    for w, t in zip(words, is_train, strict=True):
        pool = [e for e in pools[t] if e[0] != w[0]]
        examples = rng.sample(pool, min(cfg.max_icl_examples, len(pool)))
        ids, text = build_prompt(tok, lm.bos_token_id, w, examples, cfg)
        prompts.append(ids)
        texts.append(text)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for s in range(0, len(prompts), cfg.llm_batch_size):
        batch = prompts[s:s + cfg.llm_batch_size]
        ids, mask = right_pad(batch, pad)
        h = capture_resid_post(lm.model, ids.to(lm.device), [layer], mask.to(lm.device))[layer]
        last = torch.tensor([len(p) - 1 for p in batch], device=h.device)
        acts[s:s + len(batch)] = h[torch.arange(len(batch), device=h.device), last].float().cpu()
        advance(len(batch))
    return texts


def icl_groups(words: Sequence[tuple[int, str]], is_train: Sequence[bool], n_examples: int, group_size: int,
               rng: random.Random) -> list[tuple[list[int], list[tuple[int, str]]]]:
    """Partition each split's word indices (shuffled by ``rng``) into groups of ``group_size`` and draw
    each group's ``n_examples`` ICL examples uniformly from the same split, excluding the group's own
    words. A split of ``n`` words uses groups of at most ``max(n − n_examples, 1)`` so that every group
    can draw all its examples (fewer only when ``n ≤ n_examples``, as the per-prompt path).
    Returns ``[(member indices, examples)]``, train groups first."""
    pools = {split: [w for w, t in zip(words, is_train, strict=True) if t == split] for split in (True, False)}
    groups: list[tuple[list[int], list[tuple[int, str]]]] = []
    for split in (True, False):
        idx = [i for i, t in enumerate(is_train) if t == split]
        rng.shuffle(idx)
        size = max(min(group_size, len(idx) - n_examples), 1)
        for s in range(0, len(idx), size):
            members = idx[s:s + size]
            ids = {words[i][0] for i in members}
            pool = [e for e in pools[split] if e[0] not in ids]
            groups.append((members, rng.sample(pool, min(n_examples, len(pool)))))
    return groups


def _shared_prefix_activations(lm: LoadedModel, layer: int, cfg: Config, words: list[tuple[int, str]],
                               is_train: list[bool], pools: dict[bool, list[tuple[int, str]]],
                               rng: random.Random, acts: torch.Tensor, advance: Callable[[int], None]) -> list[str]:
    """Groups of ``words_per_prefix`` words of one split share an example draw (:func:`icl_groups`);
    fills ``acts``, returns the first prompts' texts."""
    texts: list[str] = []
    for members, examples in icl_groups(words, is_train, cfg.max_icl_examples, cfg.words_per_prefix, rng):
        prefix, parts = build_prefix(lm.tokenizer, lm.bos_token_id, examples, cfg)
        if len(texts) < 3:
            texts.append(cfg.example_separator.join([*parts, cfg.prompt_template.format(word=words[members[0]][1])]))
        for s in range(0, len(members), cfg.llm_batch_size):
            chunk = members[s:s + cfg.llm_batch_size]
            suffix = torch.tensor([[words[i][0]] for i in chunk], device=lm.device)
            h = capture_resid_post_shared_prefix(lm.model, prefix, suffix, layer)
            acts[chunk] = h[:, -1].float().cpu()
            advance(len(chunk))
    return texts


def encode_dense(sae: SAE, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """SAE codes ``[n, d_sae]`` (float32, CPU) of ``x [n, d_in]``, in batches on the SAE's device."""
    dev = sae.W_dec.device
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            out.append(sae.encode(x[s:s + batch_size].to(dev, sae.W_dec.dtype)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, sae.d_sae)


def _data_key(cfg: Config) -> tuple:
    return ("absorption", cfg.prompt_template, cfg.example_separator, cfg.max_icl_examples, cfg.max_words,
            cfg.min_word_len, cfg.word_start_only, cfg.train_fraction, cfg.seed, cfg.words_per_prefix)


def available(ctx: EvalContext) -> str | None:
    """None when the tokenizer has alphabetic word tokens for at least 2 letters, else the reason."""
    words = ctx.cached(("absorption", "vocab", Config.min_word_len),
                       lambda: alphabetic_words(ctx.model.tokenizer, Config.min_word_len))
    if len({w.strip()[0].lower() for _, w in words}) < 2:
        return "the tokenizer has too few alphabetic word tokens for the first-letter task"
    return None


def run(sae: SAE, ctx: EvalContext, cfg: Config) -> EvalOutput:
    """Absorption of one SAE (module doc): cached word activations and probes, then
    :func:`compute_absorption` on the SAE's codes."""
    key = _data_key(cfg)
    data: WordActivations = ctx.cached(key, lambda: word_activations(ctx.model, ctx.layer, cfg, ctx.quiet),
                                       persist=True)
    tr, te = data.is_train, ~data.is_train
    x_train, x_test = data.acts[tr], data.acts[te]
    y_train, y_test = data.letters[tr], data.letters[te]
    probes: GroundTruthProbes = ctx.cached(key + ("probes", cfg.probe_c), lambda: train_ground_truth_probes(
        x_train, y_train, x_test, y_test, cfg.probe_c, quiet=ctx.quiet), persist=True)
    test_words = [w for w, t in zip(data.words, te.tolist(), strict=True) if t]
    res = compute_absorption(x_train, y_train, x_test, y_test, encode_dense(sae, x_train), encode_dense(sae, x_test),
                             sae.W_dec.detach().float().cpu(), cfg, probes=probes, test_words=test_words)
    n_eval = int(res.metrics["n_letters_evaluated"] or 0)
    eval_config = {**asdict(cfg), "model_name": ctx.model.model_id, "hook_name": ctx.hook_name}
    unstructured = {
        "run_dir": str(ctx.run_dir), "model_id": ctx.model.model_id, "hook_name": ctx.hook_name,
        "enough_letters": n_eval >= cfg.min_letters_for_eval,
        "note": (None if n_eval >= cfg.min_letters_for_eval else
                 f"only {n_eval} letters have a ground-truth probe F1 >= {cfg.min_gt_probe_f1} "
                 f"(SAEBench requires {cfg.min_letters_for_eval}): the model knows first letters poorly here"),
        "example_prompts": data.example_prompts,
    }
    return EvalOutput(metrics={"mean": res.metrics}, details=res.letters, eval_config=eval_config,
                      unstructured=unstructured)
