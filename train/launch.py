"""``sae train --nproc N``: start ``N`` data-parallel ranks on this machine with torch's own launcher.

It is ``torchrun --standalone --nproc-per-node N -m sae train ...`` without the ``--nproc`` option,
through :func:`torch.distributed.launcher.api.elastic_launch` (the library torchrun runs on): a
c10d rendezvous on 127.0.0.1 with a free port, no restarts (a lost rank stops the job; ``--resume``
continues it with any number of ranks). The difference from calling torchrun is the report: when a
rank is killed and no rank printed an ``error:`` line, this prints one naming the rank and the
signal, instead of torchrun's traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from pathlib import Path

from ..errors import Interrupted, SaeError
from ..rundir.format import CHECKPOINT_FILE

LAUNCHED_ENV = "SAE_LAUNCHED_RANKS"
"""Set for the ranks this launcher starts: they leave lost-rank and interruption reports to it."""


class LaunchError(SaeError):
    """A data-parallel job started by ``--nproc`` stopped: a rank was killed or lost, or the job was
    interrupted (its checkpoint kept)."""

    exit_code = 3


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` with ``--name VALUE`` / ``--name=VALUE`` removed (the ranks' command line)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


def _kept(run_dir: Path) -> str:
    """What ``run_dir`` keeps for ``--resume``, in words."""
    ckpt = run_dir / CHECKPOINT_FILE
    if not ckpt.exists():
        return f"no checkpoint of {run_dir} had been written: rerun the same command"
    try:
        import torch

        step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["trainer"]["step"])
        where = f"{run_dir} keeps its checkpoint at step {step}"
    except Exception:  # noqa: BLE001 - the report must not fail; --resume checks the file itself
        where = f"{run_dir} keeps its last checkpoint"
    return f"{where}: rerun the same command with --resume (any number of ranks)"


def launch(nproc: int, argv: list[str], run_dir: Path) -> None:
    """Run ``python -m sae <argv>`` as ``nproc`` ranks of one job on this machine (training
    ``run_dir``); return when all finished.

    Reports: an error every rank meets alike (a bad store, a diverging loss) is printed by rank 0 and
    this exits with its code, printing nothing more; a rank that is killed or lost, or an
    interruption, is reported here in one line (the ranks stay silent about it).

    Raises:
        LaunchError: a rank was killed or failed without a report, or the job was interrupted.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # its own warnings would repeat our report
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHED_ENV] = "1"
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"sae-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", rdzv_configs={"is_host": True},
                          max_restarts=0, monitor_interval=0.1, start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "sae", *argv)
    except SignalException as e:
        raise Interrupted(f"interrupted by {signal.Signals(e.sigval).name}; {_kept(run_dir)}", e.sigval) from None
    except ChildFailedError as e:
        codes = {f.local_rank: f.exitcode for f in e.failures.values()}
        if all(c in (1, 2) for c in codes.values()):
            raise SystemExit(max(codes.values())) from None  # rank 0 printed the error
        # the cause, not its consequences: ranks stopped by the launcher (SIGTERM) or that lost their
        # peer (exit 3) come after a rank that was killed or failed on its own
        collateral = (-signal.SIGTERM, 128 + signal.SIGTERM, 3)
        first = min(e.failures.values(), key=lambda f: (f.exitcode in collateral, f.timestamp, f.local_rank))
        c = first.exitcode
        if c < 0:
            what = f"rank {first.local_rank} of {nproc} was killed by {signal.Signals(-c).name}"
        elif c >= 128:
            what = f"rank {first.local_rank} of {nproc} was interrupted by {signal.Signals(c - 128).name}"
        elif c == 3:
            what = f"rank {first.local_rank} of {nproc} lost contact with another rank"
        else:
            what = (f"rank {first.local_rank} of {nproc} failed with exit code {c} (rerun with SAE_DEBUG=1 to see "
                    "its traceback)")
        raise LaunchError(f"{what}; the job stopped, {_kept(run_dir)}") from None


__all__ = ["LAUNCHED_ENV", "LaunchError", "launch", "without_option"]
