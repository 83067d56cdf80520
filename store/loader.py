"""Shuffled, prefetched training batches streamed from a store (never loaded whole).

The batch stream is a pure function of ``(store, hook, seed, mix_chunks)``:

* epoch ``e`` visits the chunks in the order ``permutation(n_chunks)`` drawn from
  ``numpy.random.default_rng([seed, e])``;
* consecutive groups of ``mix_chunks`` chunks form a *window*; the window's non-special rows are
  shuffled with ``default_rng([seed, e, w])`` (the in-memory mixing buffer);
* the windows are concatenated into one endless row stream and cut into batches.

So the only resume state is ``rows_consumed`` — the store cursor saved in checkpoints.
A background thread reads and decompresses the next windows while the trainer works, fetching
the chunks of a window concurrently (``read_workers`` threads: remote stores are never read one
round-trip at a time; Blosc releases the GIL); on a GPU the window is staged in pinned memory and
copied with ``non_blocking=True``. Before and after reading a window the store's identity is
checked, so a store replaced underneath (a teammate's ``--overwrite``) stops training with one
line instead of mixing two stores' data.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .reader import ActivationStore


class ShuffledBatches:
    """Iterate ``[batch_size, d_model]`` float32 batches of ``scale * x`` on ``device``.

    Args:
        store: an opened store; ``hook_name``: which activation array.
        batch_size: rows per batch. ``seed``: shuffling seed. ``mix_chunks``: chunks mixed
            together in memory (memory ≈ mix_chunks × chunk_tokens × d_model × 4 bytes × (1 + prefetch)).
        start_row: resume cursor (rows of the stream already consumed).
        scale: multiply activations by this (the store's normalisation scale).
        exclude_special: drop BOS/special-token rows (default, per the mission doc).
    """

    def __init__(self, store: ActivationStore, hook_name: str, batch_size: int, seed: int = 0,
                 mix_chunks: int = 4, start_row: int = 0, scale: float = 1.0,
                 device: str | torch.device = "cpu", prefetch: int = 2, exclude_special: bool = True,
                 read_workers: int | None = None) -> None:
        store.check_hook(hook_name)
        self.store, self.hook_name, self.batch_size = store, hook_name, batch_size
        self.seed, self.mix_chunks, self.scale = seed, max(1, mix_chunks), scale
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.read_workers = max(1, read_workers or min(8, self.mix_chunks))
        self.rows_consumed = start_row
        tokens = store.tokens
        self._valid = [store.valid_mask(tokens[slice(*store.chunk_bounds(i))]) if exclude_special
                       else np.ones(np.subtract(*store.chunk_bounds(i)[::-1]), dtype=bool)
                       for i in range(store.n_chunks)]
        self.rows_per_epoch = int(sum(int(v.sum()) for v in self._valid))
        if self.rows_per_epoch == 0:
            raise ValueError(f"{store.path} has no non-special rows to train on")

    def _windows(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.store.n_chunks)
        return [order[i:i + self.mix_chunks] for i in range(0, len(order), self.mix_chunks)]

    def _locate(self, row: int) -> tuple[int, int, int]:
        """Stream row → (epoch, window index, offset inside that window)."""
        epoch, rem = divmod(row, self.rows_per_epoch)
        for w, chunks in enumerate(self._windows(epoch)):
            n = int(sum(int(self._valid[c].sum()) for c in chunks))
            if rem < n:
                return epoch, w, rem
            rem -= n
        raise AssertionError("unreachable: row beyond epoch")

    def _load_window(self, epoch: int, w: int, pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
        chunks = self._windows(epoch)[w]

        def read(c: int) -> torch.Tensor:
            return self.store.read_chunk(self.hook_name, int(c))[torch.from_numpy(self._valid[c])]

        self.store.check_unchanged()
        parts = list(pool.map(read, chunks)) if pool is not None else [read(c) for c in chunks]
        self.store.check_unchanged()  # unchanged before and after: every chunk came from the store we opened
        x = torch.cat(parts)
        perm = torch.from_numpy(np.random.default_rng([self.seed, epoch, w]).permutation(len(x)))
        x = x[perm]
        if self.scale != 1.0:
            x.mul_(self.scale)
        if self.device.type == "cuda":
            x = x.pin_memory()
        return x

    def _producer(self, q: queue.Queue, stop: threading.Event, epoch: int, w: int) -> None:
        pool = ThreadPoolExecutor(self.read_workers, thread_name_prefix="store-read") if self.read_workers > 1 else None
        try:
            while not stop.is_set():
                x = self._load_window(epoch, w, pool)
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                w += 1
                if w == len(self._windows(epoch)):
                    epoch, w = epoch + 1, 0
        except BaseException as e:  # forward errors (e.g. a corrupt chunk) to the consumer
            q.put(e)
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, w, offset = self._locate(self.rows_consumed)
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._producer, args=(q, stop, epoch, w), daemon=True)
        thread.start()

        def next_window() -> torch.Tensor:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            return item.to(self.device, non_blocking=True)

        try:
            buf = next_window()[offset:]
            while True:
                parts, need = [], self.batch_size
                while need:
                    if len(buf) == 0:
                        buf = next_window()
                    take = buf[:need]
                    parts.append(take)
                    buf = buf[len(take):]
                    need -= len(take)
                batch = parts[0] if len(parts) == 1 else torch.cat(parts)
                self.rows_consumed += self.batch_size
                yield batch
        finally:
            stop.set()
            thread.join(timeout=5)
