"""Outputs we own: recognising our stores and run directories, and replacing them atomically.

Safety rules (docs/sharing-and-safety.md, "Safety"):

* ``--overwrite`` replaces only a path that *is* one of ours (a store with our attributes, a run
  directory with our marker or ``cfg.json``). Anything else is refused in one line.
* A replacement is built beside the old output (a hidden *staging* sibling), swapped into place
  at the end (one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux) and only then is the old data
  deleted. A failed or killed overwrite leaves the old output untouched.
* A failed *new* output that holds nothing resumable is removed, so the corrected retry is not
  refused as "already exists".
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import SaeError

RUN_MARKER = ".sae_run"
"""File written into every run directory when it is created (JSON: package version, created)."""
STAGING_TAG = ".sae-staging-"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Path, obj: object, *, indent: int = 2, sort_keys: bool = False,
                      allow_nan: bool = True) -> None:
    """Write ``obj`` as JSON to ``path`` through a sibling temporary file renamed over it, so a reader (or a
    kill) never sees half a file.

    Raises:
        OSError: the folder cannot be written. ValueError: a non-finite float with ``allow_nan=False``.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")
    os.replace(tmp, path)


def is_store_attrs(attrs: object) -> bool:
    """True when a group's attributes are those of a store written by ``sae harvest``/``convert``."""
    return isinstance(attrs, dict) and all(k in attrs for k in ("format_version", "store_id", "hook_names"))


def is_sae_store(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a Zarr group written by ``sae harvest``/``convert``."""
    return is_store_attrs(((_read_json(Path(path) / "zarr.json")) or {}).get("attributes"))


def pid_alive(pid: object) -> bool:
    """Whether process ``pid`` of this host still runs (True when it cannot be told)."""
    try:
        os.kill(int(pid), 0)  # type: ignore[call-overload]
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True
    return True


def is_sae_run(path: str | Path) -> bool:
    """True when ``path`` is a run directory written by ``sae train``/``sae sweep``."""
    p = Path(path)
    if (p / RUN_MARKER).is_file():
        return True
    cfg = _read_json(p / "cfg.json")
    return cfg is not None and "sae_version" in cfg and "train_config" in cfg


REPORT_MARKER = ".sae_report"
"""File written into every report folder by ``sae report`` (JSON: package version, created)."""


def is_sae_report(path: str | Path) -> bool:
    """True when ``path`` is a report folder written by ``sae report`` (its marker; reports written before
    the marker existed: ``index.html`` beside ``metrics.csv`` and ``headline.md``)."""
    p = Path(path)
    if (p / REPORT_MARKER).is_file():
        return True
    return all((p / n).is_file() for n in ("index.html", "metrics.csv", "headline.md"))


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_location(path: str | Path, option: str) -> None:
    """Raise ``SaeError`` unless ``path`` can be created or written: it is not a file, and its nearest
    existing ancestor is a writable directory. Creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SaeError(f"{option} {p} is a file, not a directory: pick another {option}")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise SaeError(f"{option} {p}: {probe} is a file, so the directory cannot be created; pick another {option}")
    if not os.access(probe, os.W_OK | os.X_OK) or not _can_create_in(probe):
        raise SaeError(f"{option} {p}: {probe} is not writable; pick a writable {option}")


def check_writable_dir(path: str | Path, option: str) -> None:
    """Raise ``SaeError`` unless a file can be created in the existing directory ``path`` (and in its
    ``commits`` folder when there is one): growing or resuming a store on a read-only mount, or one we lack
    permission for, is refused up front, before a model loads. Creates nothing that stays."""
    p = Path(path)
    for d in (p, p / "commits"):
        if d.is_dir() and not _can_create_in(d):
            raise SaeError(f"{option} {p}: {d} is read-only here (a read-only mount, or no write permission); "
                           "copy the store somewhere writable, or ask its owner to grow it")


def _can_create_in(directory: Path) -> bool:
    """Create and remove one empty probe file (``os.access`` says yes to root even on read-only
    mounts and pseudo file systems)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".sae-probe-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return True


def staging_sibling(path: Path) -> Path:
    """A fresh hidden sibling of ``path`` to build a replacement in."""
    return path.parent / f".{path.name}{STAGING_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def swap_into_place(new: Path, path: Path) -> None:
    """Move the finished ``new`` to ``path``; the old ``path`` (if any) is deleted only afterwards.

    With ``renameat2`` the swap is one atomic step: a reader or a kill sees the old or the new
    output, never neither. Elsewhere it is two renames and a kill between them leaves the old data
    in a staging sibling (never lost).
    """
    if not path.exists():
        os.replace(new, path)
        return
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now names the old output
        return
    trash = staging_sibling(path)
    os.replace(path, trash)
    os.replace(new, path)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_staging(path: Path) -> None:
    """Delete staging siblings of ``path`` left by killed overwrites whose process is gone."""
    prefix = f".{path.name}{STAGING_TAG}"
    if not path.parent.is_dir():
        return
    for p in path.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or pid_alive(pid):
            continue  # not our pattern, or its process still runs (perhaps another overwrite)
        shutil.rmtree(p, ignore_errors=True)  # our own naming pattern: created by a killed sae process


def refuse_unless_ours(path: Path, is_ours: Callable[[Path], bool], what: str,
                       error: type[SaeError] = SaeError) -> None:
    """Raise ``error`` when an existing, non-empty ``path`` is not ``what`` of ours."""
    if path.exists() and not is_empty_dir(path) and not is_ours(path):
        raise error(f"{path} exists and is not {what}; refusing to delete it (pick another path, "
                       "or move it away yourself)")


class OutputBuild:
    """A new output being built: :attr:`target` is where to write; :meth:`commit` puts it in place,
    :meth:`abort` removes what was built (see :func:`build_output` for the rules)."""

    def __init__(self, path: str | Path, *, overwrite: bool, is_ours: Callable[[Path], bool], what: str,
                 keep_partial: Callable[[], bool] = lambda: False, error: type[SaeError] = SaeError) -> None:
        self.path = Path(path)
        self.keep_partial = keep_partial
        self.existed_empty = is_empty_dir(self.path)
        if self.path.exists() and not self.existed_empty:
            if not overwrite:
                raise error(f"{self.path} already exists: pass --resume to continue it or --overwrite to replace it")
            refuse_unless_ours(self.path, is_ours, what, error)
            remove_stale_staging(self.path)
            self.target = staging_sibling(self.path)
        else:
            self.target = self.path
        self.done = False

    @property
    def staged(self) -> bool:
        return self.target != self.path

    def commit(self) -> None:
        if not self.done and self.staged:
            swap_into_place(self.target, self.path)
        self.done = True

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        if self.staged:
            shutil.rmtree(self.target, ignore_errors=True)
        elif not self.keep_partial() and self.target.exists():
            shutil.rmtree(self.target, ignore_errors=True)
            if self.existed_empty:
                self.target.mkdir(exist_ok=True)


@contextlib.contextmanager
def build_output(path: str | Path, *, overwrite: bool, is_ours: Callable[[Path], bool], what: str,
                 keep_partial: Callable[[], bool] = lambda: False,
                 error: type[SaeError] = SaeError) -> Iterator[Path]:
    """Yield the directory to build a new output in, and put it in place when the block succeeds.

    * ``path`` absent (or an empty directory): build in place. On failure remove what was built,
      unless ``keep_partial()`` says it is resumable.
    * ``path`` exists and ``overwrite``: it must be ours (``is_ours``), else ``error``. Build in a
      staging sibling; on success swap it into place and delete the old; on failure delete the
      staging copy — the old output is untouched.
    * ``path`` exists without ``overwrite``: ``error`` naming ``--resume``/``--overwrite``.
    """
    build = OutputBuild(path, overwrite=overwrite, is_ours=is_ours, what=what, keep_partial=keep_partial,
                        error=error)
    try:
        yield build.target
    except BaseException:
        build.abort()
        raise
    build.commit()
