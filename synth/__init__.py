"""Synthetic activation stores with known ground truth (SynthSAEBench, arXiv 2602.14687).

The generator is SAELens' (``sae_lens.synthetic``, the ``synth`` extra); what is ours is the preset
table (:mod:`.presets`) and the store it is written into (:mod:`.store`): an ordinary format-2
store that every command reads, plus the ground-truth dictionary the ``ground_truth`` evaluation
needs.
"""
