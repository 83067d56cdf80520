"""Distributed harvest on dask: activation chunks are the tasks.

The coordinating process (``sae harvest --workers N`` or ``--scheduler ADDRESS``) creates or
reopens the store, holds its lease and writes the complete ``tokens`` array, exactly as a
single-process harvest does. Each missing chunk then becomes one dask task,
:func:`harvest_chunk`: the worker process loads the model once (a per-process cache, checked
against the store's ``model_fingerprint``), reads the chunk's token ids from the store, runs the
same :func:`~sae.harvest.forward.forward_chunk` and writes and commits the chunk straight into
the store URL (:class:`~sae.store.ChunkWriter`: local path or object store). Commits are per
chunk, so a worker that dies mid-task leaves at most an uncommitted chunk; dask reschedules its
tasks on the surviving (or restarted) workers and the retry overwrites it. The coordinator then
finalizes (statistics reduced in chunk order, content digest): the same store as a
single-process harvest, bit for bit on the same hardware and dtype.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..cluster import worker_device
from ..model import LoadedModel, hook_name_for, load_model
from ..store import ChunkWriter, StoreError
from .forward import forward_chunk

TEST_DELAY_ENV = "SAE_HARVEST_CHUNK_DELAY_S"
"""Test hook: seconds each task sleeps before its forward pass (lets a test kill a busy worker)."""


@dataclass(frozen=True)
class ChunkJob:
    """Everything a worker needs for one store's chunks (picklable; credentials included, so only
    send it to workers you trust with the store)."""

    url: str
    model_id: str | None
    model_weights: str | None
    fingerprint: str
    layers: tuple[int, ...]
    batch_size: int
    context_size: int
    device: str
    special_token_ids: tuple[int, ...]
    storage_options: dict = field(default_factory=dict, hash=False, compare=False)


_MODELS: dict[tuple, LoadedModel] = {}
"""The model of this worker process (loaded by its first task, reused by every later one)."""


def worker_model(job: ChunkJob) -> LoadedModel:
    """This process's model for ``job``, loaded once. Raises ``StoreError`` if its weights are not the store's."""
    device = worker_device(job.device)
    key = (job.model_id, job.model_weights, device)
    if key not in _MODELS:
        _MODELS.clear()  # one model per process
        _MODELS[key] = load_model(job.model_id, device, model_weights=job.model_weights)
    lm = _MODELS[key]
    if lm.fingerprint != job.fingerprint:
        raise StoreError(f"worker loaded {job.model_id} with weights fingerprint {lm.fingerprint}, but the store "
                         f"was harvested with {job.fingerprint}: give every worker the same model files")
    return lm


def harvest_chunk(job: ChunkJob, i: int) -> int:
    """Compute, write and commit chunk ``i`` of every hook in ``job`` (one dask task). Returns its rows."""
    lm = worker_model(job)
    writer = ChunkWriter.open(job.url, [hook_name_for(L) for L in job.layers], job.storage_options)
    flat = writer.tokens(i)
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    acts = forward_chunk(lm, flat.reshape(-1, job.context_size), list(job.layers), job.batch_size)
    valid = ~np.isin(flat, np.asarray(job.special_token_ids, dtype=np.int64))
    writer.write_chunk(i, {hook_name_for(L): acts[L] for L in job.layers}, valid)
    return len(flat)


def run_chunks(client: Any, job: ChunkJob, todo: list[int], bar: Any, task: Any) -> int:
    """Submit every chunk of ``todo``; advance ``bar`` as each commits. Returns the rows committed.

    A task that raises is retried twice elsewhere; a worker that dies has its tasks rescheduled by
    dask. The first task that still fails re-raises here (its chunk stays uncommitted: ``--resume``).
    """
    from distributed import as_completed

    tag = uuid.uuid4().hex[:8]
    futures = [client.submit(harvest_chunk, job, i, key=f"sae-harvest-{tag}-{i}", pure=False, retries=2)
               for i in todo]
    done = 0
    for n_committed, fut in enumerate(as_completed(futures), start=1):
        rows = int(fut.result())
        done += rows
        bar.update(task, advance=rows, description=f"harvest ({n_committed}/{len(todo)} chunks)")
    return done
