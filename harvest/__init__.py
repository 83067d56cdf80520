"""Harvest stage: run a language model once over a corpus and write ``resid_post`` activations
to a Zarr store (:mod:`sae.store`)."""
