"""Presentation: the static HTML report (:func:`build_report`) and the feature browser.

It reads run directories (``cfg.json``, ``metrics.jsonl``, ``eval_results/*.json``) and stores, and
computes no evaluation metric itself: of the evaluation package it imports only
:mod:`sae.rundir.results` (the result-file format). Modules: :mod:`.runs` (loading runs),
:mod:`.tables`, :mod:`.figures`, :mod:`.page` (assembly), :mod:`.browser`.
"""

from .page import build_report
from .runs import RunInfo, flatten_metrics, load_run, resolve_run_dirs
from .tables import headline_markdown

__all__ = ["RunInfo", "build_report", "flatten_metrics", "headline_markdown", "load_run", "resolve_run_dirs"]
