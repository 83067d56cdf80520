"""Random chunking of the latents, shared by the chunked penalties (``static_ortho``, ``ortsae``).
Not a variant: variants import it, never each other.

Each step, ``ctx.generator`` (seeded by ``(seed, step)``, hence resume-exact) draws a random
permutation of the F latents cut into consecutive chunks of ``chunk_size``; a penalty restricted to
pairs inside the used chunks is an unbiased estimate over all pairs, at ``O(n·c·d)`` cost.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BLOCK = 8  # chunks per batched matmul (bounds the temporary [block, c, d] gather)


def random_chunks(d_sae: int, chunk_size: int, chunks_per_step: int, generator: torch.Generator) -> Tensor:
    """A random partition of ``range(F)`` into chunks, ``[m, c]`` long (CPU), padded with ``F``.

    Row ``r`` holds chunk ``r`` of ``randperm(F, generator)`` cut every ``c = min(chunk_size, F)``
    entries; the last chunk is padded with the index ``F`` (meaning "no latent"). Only the first
    ``chunks_per_step`` rows are returned (0 = all ``ceil(F/c)``).
    """
    c = max(1, min(chunk_size, d_sae))
    perm = torch.randperm(d_sae, generator=generator)
    m = -(-d_sae // c)
    out = torch.full((m * c,), d_sae, dtype=torch.long)
    out[:d_sae] = perm
    out = out.view(m, c)
    return out[:chunks_per_step] if 0 < chunks_per_step < m else out


def chunk_sizes(d_sae: int, chunks: Tensor) -> list[int]:
    """Real latents per row of ``chunks`` from :func:`random_chunks`, by arithmetic (no tensor read):
    every chunk is full except the last of the partition, which holds ``F − (M − 1)·c``."""
    m, c = chunks.shape
    total = -(-d_sae // c)
    return [c] * m if m < total else [c] * (m - 1) + [d_sae - (total - 1) * c]


def padded(W: Tensor) -> Tensor:
    """``W`` with one zero row appended (the padding index ``F`` of :func:`random_chunks`)."""
    return torch.cat([W, W.new_zeros(1, W.shape[1])])
