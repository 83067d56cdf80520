"""sae: harvest residual-stream activations once into a Zarr store, then train and evaluate
sparse autoencoders (with orthogonality regularisers) from it.

Subpackages: :mod:`sae.harvest` (LM forward → store), :mod:`sae.store` (format, reading,
shuffled streaming), :mod:`sae.train` (SAE, trainer, variants), :mod:`sae.evaluate`
(SAEBench-style metrics), :mod:`sae.model` (the one module that touches the language model).
"""

__version__ = "0.1.0"
