"""The run directory: the artefact ``sae train``/``sae sweep`` write and every later stage reads.

The twin of :mod:`sae.store`. Its modules: :mod:`.format` (file names; the spec is
``docs/run-directory.md``), :mod:`.sae` (the SAE's saved form and its loader), :mod:`.codes` (the
sparse codes its forward pass produces), :mod:`.saelens` and :mod:`.canonical` (every SAELens
``cfg.json`` layout, converted exactly to ours), :mod:`.metrics` (the one tolerant ``metrics.jsonl``
reader), :mod:`.state` (what evaluations may read of the training state), :mod:`.results`
(``eval_results/<eval>.json``) and :mod:`.identity` (whether an SAE fits a model or a store).

It imports only the root modules (``errors``, ``outputs``, ``model``'s hook names): the training
loop, the evaluations and the report build on it, never the reverse.
"""
