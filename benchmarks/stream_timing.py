"""Timing a loader's batch stream, shared by ``scale.py``, ``read.py`` and ``loader_ab.py``.

It imports nothing from ``sae``, so ``loader_ab.py`` can time an older commit's loader with it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any


def stream_tokens_per_s(batches: Iterator[Any], n: int, batch_size: int, warmup: int = 8,
                        sync: Callable[[], None] = lambda: None) -> float:
    """Tokens/s over ``n`` batches of ``batch_size`` rows from ``batches``, after ``warmup`` batches
    are drained untimed. A loader fills its read-ahead queue as soon as it starts, so without the
    warm-up the first batches come from that queue and the rate is inflated. ``sync`` waits for the
    device (e.g. ``torch.cuda.synchronize``) before each clock reading."""
    for _ in range(warmup):
        next(batches)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    sync()
    return n * batch_size / (time.perf_counter() - t0)
