"""``sae store verify``: read every chunk of every array and check a store end to end.

Checks (format 2; a format-1 store has no checksums, so only decoding, ranges, counts and
statistics are checked):

* **checksums** — every chunk decodes (zarr verifies each chunk's ``crc32c`` codec), and the
  crc32c stored in the chunk equals the one its commit object recorded;
* **tokens** — every id lies in ``[0, vocab_size)`` (``vocab_size`` from the store's attributes;
  ``>= 0`` when unknown), so a missing chunk (read back as the fill value ``-1``) is caught;
* **rows** — every array has ``n_tokens`` rows and every chunk of every hook is committed;
* **statistics** — the per-hook mean and E‖x‖² recomputed from the stored values (float64, chunk
  order, non-special rows) equal the recorded ones (relative 1e-9);
* **digest** — sha256 over the chunks' crc32c equals the recorded ``content_digest``.

Chunks are read by ``workers`` threads in parallel.
"""

from __future__ import annotations

import hashlib
import struct
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .format import COMMITS, TOKENS, array_names, scale_array_name
from .reader import ActivationStore
from .writer import TOKENS_COMMIT, chunk_crc, content_digest

REL_TOL = 1e-9


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`: ``checks`` rows ``(name, ok, detail)`` and ``bad_chunks``
    rows ``(array, chunk, "start:stop", problem)``; ``bytes_read`` stored bytes in ``seconds``."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    bad_chunks: list[tuple[str, int, str, str]] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad_chunks and all(ok for _, ok, _ in self.checks)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9


def verify_store(store: ActivationStore, workers: int = 4, progress: object | None = None) -> VerifyReport:
    """Verify ``store`` (opened with ``require_complete=False`` to inspect unfinished stores too).

    ``progress``: an optional rich ``Progress`` to advance per chunk. Never raises for a corrupt
    store: every problem is a row of the report.
    """
    rep = VerifyReport()
    t0 = time.perf_counter()
    n, ct = store.n_tokens, store.chunk_tokens
    v2 = store.format_version >= 2
    n_chunks = -(-n // ct) if n else 0
    hooks = store.hook_names
    arrays = array_names(hooks, store.codec.has_scale)  # the digest order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep.bytes_read = store.nbytes_stored()
    # rows
    short = [a for a in arrays if store.array(a).shape[0] < n]
    rep.checks.append(("rows", not short, f"{n:,} rows in {n_chunks} chunks of {ct:,}" if not short
                       else f"arrays shorter than {n:,} rows: {', '.join(short)}"))
    recorded_crcs = _recorded_crcs(store, rep, arrays, n_chunks) if v2 else {a: [None] * n_chunks for a in arrays}
    vocab = store.attrs.get("vocab_size")
    special = np.asarray(store.special_token_ids, dtype=np.int64)
    tokens_by_chunk: list[np.ndarray | None] = [None] * n_chunks

    def check_chunk(array: str, i: int) -> tuple[str, int, object, list[str]]:
        start, stop = store.chunk_bounds(i)
        problems: list[str] = []
        ndim = 2 if array in hooks else 1
        if v2:
            try:
                crc = chunk_crc(store.loc, array, i, ndim)
                if recorded_crcs[array][i] is not None and crc != recorded_crcs[array][i]:
                    problems.append(f"crc32c {crc:08x} differs from the committed {recorded_crcs[array][i]:08x}")
            except (OSError, struct.error, ValueError) as e:
                problems.append(f"chunk object missing or unreadable ({e.__class__.__name__})")
        value: object = None
        try:
            if array in hooks:
                value = store.read_rows(array, start, stop)  # decodes data (and scale): crc32c verified
            else:
                value = np.asarray(store.array(array)[start:stop])
        except Exception as e:  # noqa: BLE001 - any decode failure is corruption
            why = str(e).splitlines()[0][:80] if str(e) else ""
            problems.append(f"does not decode ({e.__class__.__name__}: {why})")
        if array == TOKENS and value is not None:
            tok = np.asarray(value)
            bad = (tok < 0) | ((tok >= vocab) if vocab else False)
            if bad.any():
                problems.append(f"{int(bad.sum())} token ids outside [0, {vocab or '∞'})")
        return array, i, value, problems

    sums: dict[str, list[tuple[np.ndarray, float, int] | None]] = {h: [None] * n_chunks for h in hooks}
    # tokens first (the statistics need each chunk's special-token mask), then every other array
    jobs = [(a, i) for a in arrays for i in range(n_chunks)]
    task = progress.add_task("verify", total=len(jobs)) if progress is not None else None
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for array, i, value, problems in pool.map(lambda job: check_chunk(*job), jobs[:n_chunks]):
            tokens_by_chunk[i] = np.asarray(value) if value is not None else None
            _record(rep, store, array, i, problems)
            if task is not None:
                progress.advance(task)

        def hook_job(job: tuple[str, int]) -> tuple[str, int, object, list[str]]:
            array, i, value, problems = check_chunk(*job)
            if array in hooks and value is not None and tokens_by_chunk[i] is not None:
                mask = ~np.isin(tokens_by_chunk[i], special)
                x = value.double().numpy()[mask]  # type: ignore[union-attr]
                value = (x.sum(0), float((x * x).sum()), int(mask.sum()))
            return array, i, value, problems

        for array, i, value, problems in pool.map(hook_job, jobs[n_chunks:]):
            _record(rep, store, array, i, problems)
            if array in hooks and isinstance(value, tuple):
                sums[array][i] = value
            if task is not None:
                progress.advance(task)
    _check_statistics(store, rep, sums)  # reduced in chunk order exactly as the writer does
    if v2:
        _check_digests(store, rep, arrays, recorded_crcs)
    else:
        rep.checks.append(("checksums", True, "format 1: no checksums (convert to format 2 with `sae store convert`)"))
    bad = {(a, i) for a, i, _, _ in rep.bad_chunks}
    rep.checks.insert(0, ("chunks", not bad, f"{len(jobs)} chunks read, {len(bad)} bad"))
    rep.seconds = time.perf_counter() - t0
    return rep


def _recorded_crcs(store: ActivationStore, rep: VerifyReport, arrays: list[str], n_chunks: int
                   ) -> dict[str, list[int | None]]:
    """The crc32c each chunk of each array was committed with (format 2); a missing commit object is a
    bad chunk of the report and leaves None."""
    n, hooks = store.n_tokens, store.hook_names
    recorded_crcs: dict[str, list[int | None]] = {a: [None] * n_chunks for a in arrays}
    try:
        recorded_crcs[TOKENS] = list(store.loc.read_json(COMMITS, TOKENS_COMMIT)["crc32c"])
    except (OSError, ValueError, KeyError):
        rep.bad_chunks.append((TOKENS, -1, f"0:{n}", "commits/tokens.json is missing or unreadable"))
    for h in hooks:
        for i in range(n_chunks):
            try:
                rec = store.loc.read_json(COMMITS, h, f"{i}.json")
            except (OSError, ValueError):
                start, stop = store.chunk_bounds(i)
                rep.bad_chunks.append((h, i, f"{start}:{stop}", "not committed (no commit object)"))
                continue
            recorded_crcs[h][i] = int(rec["crc32c"][0])
            if store.codec.has_scale:
                recorded_crcs[scale_array_name(h)][i] = int(rec["crc32c"][1])
    return recorded_crcs


def _check_statistics(store: ActivationStore, rep: VerifyReport,
                      sums: dict[str, list[tuple[np.ndarray, float, int] | None]]) -> None:
    """Recompute each hook's statistics from the per-chunk sums (in chunk order, as the writer reduces
    them) and compare with the recorded ones; one check row per hook."""
    stats = store.attrs.get("stats") or {}
    for h in store.hook_names:
        parts = sums[h]
        if not stats.get(h):
            rep.checks.append((f"statistics {h}", False, "no recorded statistics (unfinished store?)"))
            continue
        if any(p is None for p in parts):
            rep.checks.append((f"statistics {h}", False, "not recomputable: some chunks do not decode"))
            continue
        total, sq, cnt = np.zeros(store.d_model), 0.0, 0
        for s, q, c in parts:  # type: ignore[misc]
            total += s
            sq += q
            cnt += c
        mean, msq = total / max(cnt, 1), sq / max(cnt, 1)
        rec_mean = np.asarray(stats[h]["mean"], dtype=np.float64)
        rec_msq = float(stats[h]["mean_sq_norm"])
        err = max(float(np.abs(mean - rec_mean).max() / (np.abs(rec_mean).max() + 1e-30)),
                  abs(msq - rec_msq) / (abs(rec_msq) + 1e-30))
        ok = err <= REL_TOL and cnt == int(store.attrs.get("stats_count", cnt))
        rep.checks.append((f"statistics {h}", ok, f"E‖x‖² {msq:,.4g} over {cnt:,} rows (max rel. diff {err:.1e})"))


def _check_digests(store: ActivationStore, rep: VerifyReport, arrays: list[str],
                   recorded_crcs: dict[str, list[int | None]]) -> None:
    """The content digest from the committed crc32c values, and each prefix digest of the store's history."""
    hooks = store.hook_names
    crcs = recorded_crcs
    if all(c is not None for a in arrays for c in crcs[a]):
        digest = content_digest([int(c) for a in arrays for c in crcs[a]])  # type: ignore[arg-type]
        rec = store.content_digest
        note = ""
        if digest != rec:  # stores grown by --into before the digest order became canonical
            legacy = [TOKENS] + [a for h in hooks for a in array_names([h], store.codec.has_scale)[1:]]
            if content_digest([int(c) for a in legacy for c in crcs[a]]) == rec:  # type: ignore[arg-type]
                digest, note = rec, " (hooks in the order they were added: written before the digest order " \
                                    "was canonical)"
        rep.checks.append(("content digest", digest == rec, f"{str(digest)[:16]}…" + note + (
            "" if digest == rec else f" ≠ recorded {str(rec)[:16]}…")))
    else:
        rep.checks.append(("content digest", False, "not computable: chunks are not all committed"))
    for entry in store.attrs.get("digest_history") or []:
        if isinstance(entry, dict) and entry.get("crc32c"):
            rep.checks.append(_prefix_check(store, entry, recorded_crcs))


def _prefix_check(store: ActivationStore, entry: dict, recorded: dict[str, list[int | None]]
                  ) -> tuple[str, bool, str]:
    """Re-verify the digest a store had before ``--extend`` grew it: its recorded chunk crc32c give that
    digest, the chunks it had in full are the current ones (same crc32c, checked against the bytes
    above), and the partial chunk it ended with still starts with the same stored bytes (sha256)."""
    n1, old = int(entry["n_tokens"]), entry["crc32c"]
    order = array_names(list(entry["hook_names"]), store.codec.has_scale)
    name = f"prefix digest ({n1:,} rows)"
    if content_digest([int(c) for a in order for c in old[a]]) != entry.get("content_digest"):
        return name, False, "its recorded chunk checksums do not give its digest"
    boundary = entry.get("boundary")
    full = boundary["chunk"] if boundary else -(-n1 // store.chunk_tokens)
    for a in order:
        if any(recorded[a][i] != old[a][i] for i in range(full)):
            return name, False, f"{a}: a chunk of the first {n1:,} rows changed"
    if boundary:
        start, stop = boundary["rows"]
        for a in order:
            now = np.ascontiguousarray(np.asarray(store.array(a)[start:stop])).tobytes()
            if hashlib.sha256(now).hexdigest() != boundary["sha256"][a]:
                return name, False, f"{a}: rows {start}:{stop} changed"
    return name, True, f"{str(entry['content_digest'])[:16]}… still verifiable"


def _record(rep: VerifyReport, store: ActivationStore, array: str, i: int, problems: list[str]) -> None:
    if problems:
        start, stop = store.chunk_bounds(i)
        rep.bad_chunks.append((array, i, f"{start}:{stop}", "; ".join(problems)))
