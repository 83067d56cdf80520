"""One writer at a time: the ``lease.json`` object of a store.

A writer creates ``lease.json`` atomically (``O_EXCL`` on local disk, a conditional PUT on object
stores), refreshes its ``heartbeat`` every :data:`HEARTBEAT_S` seconds from a background thread and
deletes it when done. A second writer finds the object and fails with one line naming the holder.
A lease whose heartbeat is older than :data:`STALE_S` (10 minutes: its holder died), or whose
holder was a process of this host that no longer runs, may be taken over by ``--resume``.

:func:`replacing` holds an old store's lease while ``--overwrite`` replaces it, and :func:`building` is where
every command that writes a new store (harvest, synth, convert, import) gets its target from.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..outputs import build_output, is_sae_store, is_store_attrs, pid_alive
from .format import LEASE_FILE, StoreError
from .location import StoreLocation

HEARTBEAT_S = 60.0
STALE_S = 600.0


class LeaseHeldError(StoreError):
    """Another process holds the store's lease."""


def live_holder(loc: StoreLocation) -> dict[str, Any] | None:
    """The record of the lease on ``loc`` when a live writer holds it (heartbeat younger than
    :data:`STALE_S`, and not a dead process of this host); None when free or stale."""
    try:
        held = loc.read_json(LEASE_FILE, fresh=True)
    except (FileNotFoundError, OSError, ValueError):
        return None
    if not isinstance(held, dict):
        return None
    age = time.time() - float(held.get("heartbeat", 0) or 0)
    dead = held.get("host") == socket.gethostname() and not pid_alive(held.get("pid"))
    return None if age > STALE_S or dead else {**held, "age_s": age}


def check_not_leased(loc: StoreLocation, option: str) -> None:
    """Raise :class:`LeaseHeldError` when another live writer holds ``loc``'s lease: a destructive or
    growing operation (``option``: ``--overwrite``, ``--into``, ``--extend``, ``--resume``...) must not
    start under it. The message names the holder's host, pid and lease age and how to take over."""
    held = live_holder(loc)
    if held is None:
        return
    who = f"{held.get('owner', '?')}@{held.get('host', '?')} pid {held.get('pid', '?')}"
    raise LeaseHeldError(f"{option} {loc}: the store is being written by {who} ({held.get('purpose', '?')}, last "
                         f"heartbeat {held['age_s']:.0f} s ago); wait for it to finish. A lease whose holder died is "
                         f"taken over once its heartbeat is {STALE_S / 60:.0f} min old (at once when its process on "
                         "this host is gone)")


class Lease:
    """The lease of ``loc``; use :meth:`acquire` / :meth:`release` (or ``with``)."""

    def __init__(self, loc: StoreLocation, purpose: str = "harvest") -> None:
        self.loc, self.purpose = loc, purpose
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"owner": os.environ.get("USER", "") or str(os.getuid()), "host": socket.gethostname(),
                "pid": os.getpid(), "purpose": self.purpose, "token": self.token, "heartbeat": time.time()}

    def acquire(self, takeover_stale: bool = False) -> Lease:
        """Create the lease or raise :class:`LeaseHeldError` naming its holder. With
        ``takeover_stale``, a lease without a heartbeat for :data:`STALE_S` is replaced."""
        try:
            self.loc.write_json(self._record(), LEASE_FILE, exclusive=True)
        except FileExistsError:
            try:
                held = self.loc.read_json(LEASE_FILE, fresh=True)
            except (FileNotFoundError, ValueError):
                held = {}
            age = time.time() - float(held.get("heartbeat", 0))
            who = f"{held.get('owner', '?')}@{held.get('host', '?')} pid {held.get('pid', '?')}"
            dead = held.get("host") == socket.gethostname() and not pid_alive(held.get("pid"))
            if takeover_stale and (age > STALE_S or dead):
                self.loc.write_json(self._record(), LEASE_FILE)
            else:
                hint = ("its holder is gone: continue with --resume" if age > STALE_S or dead
                        else "wait for it to finish, or write elsewhere")
                raise LeaseHeldError(f"{self.loc} is being written by {who} ({held.get('purpose', '?')}, last "
                                     f"heartbeat {age:.0f} s ago); {hint}") from None
        self._thread = threading.Thread(target=self._beat, name="sae-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                held = self.loc.read_json(LEASE_FILE, fresh=True)
                if held.get("token") != self.token:
                    return  # taken over (we were presumed dead): stop refreshing
                self.loc.write_json(self._record(), LEASE_FILE)
            except (OSError, ValueError):
                continue

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self.loc.read_json(LEASE_FILE, fresh=True).get("token") == self.token:
                self.loc.remove(LEASE_FILE)
        except (FileNotFoundError, OSError, ValueError):
            pass

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def replacing(loc: StoreLocation, option: str = "--overwrite", *, enabled: bool = True) -> Iterator[None]:
    """Hold the lease of the store at ``loc`` (if one is there) while it is being replaced: a live
    writer's lease refuses the replacement in one line (:func:`check_not_leased`), and while we hold
    it no other writer can start on the old store. A stale lease is taken over. ``enabled=False``
    (no ``--overwrite``: nothing will be replaced) does nothing."""
    if not enabled:
        yield
        return
    try:
        ours = is_store_attrs(loc.read_json("zarr.json", fresh=True).get("attributes"))
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:  # nothing of ours there: nothing to lease (and never write into what is not ours)
        yield
        return
    check_not_leased(loc, option)
    with Lease(loc, "overwrite").acquire(takeover_stale=True):
        yield


@contextlib.contextmanager
def building(loc: StoreLocation, *, overwrite: bool,
             keep_partial: Callable[[], bool] = lambda: False) -> Iterator[Path | StoreLocation]:
    """Where to write a new store for ``loc``: a local one is built in a staging folder beside it and
    swapped in when the block ends without an error (:func:`~sae.outputs.build_output`; an existing store
    of ours is replaced only with ``overwrite``, its lease held meanwhile: :func:`replacing`); a remote one
    is written in place (``loc`` itself). ``keep_partial``: whether a failed build keeps its staging folder.

    Raises:
        StoreError: the local target exists and is not a store of ours, or is one and ``overwrite`` is
            not set, or a live writer holds its lease.
    """
    if not loc.local:
        yield loc
        return
    with replacing(loc, enabled=overwrite), build_output(
            loc.path, overwrite=overwrite, is_ours=is_sae_store, what="an sae store", error=StoreError,
            keep_partial=keep_partial) as target:
        yield target
