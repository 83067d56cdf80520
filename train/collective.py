"""The collective operations a data-parallel training step needs, behind one small interface.

One process (:data:`LOCAL`) makes every operation the identity, so the trainer, the architectures
and the loop are written once. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment)
:func:`from_env` joins the ``torch.distributed`` process group (gloo on the CPU, NCCL on CUDA) and
returns a :class:`TorchCollective`.

How one global batch of ``B`` rows is trained on ``W`` ranks (docs/distributed.md, "Data-parallel
training of one SAE"): rank ``r`` holds rows ``[r·B/W, (r+1)·B/W)``; every loss term is written as a sum over
the local rows divided by a *global* normaliser (Σ‖x − x̄‖² with the global mean, the global ``B``),
so the **sum** of the ranks' gradients is the one-process gradient; terms that depend on the
parameters and on statistics every rank holds identically (the orthogonality penalties, given the
gathered codes of the global batch) are added as ``1/W`` of themselves on every rank.

Every operation raises :class:`DistributedError` when a peer is gone (killed, crashed), so the
loop stops with one ``error:`` line instead of waiting for a timeout.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from ..errors import ConfigError, SaeError
from ..rundir.sae import SparseCodes

T = TypeVar("T")
TIMEOUT_ENV = "SAE_DIST_TIMEOUT_S"
"""Seconds a collective may wait for a peer before failing (default 600; a dead peer is seen at once)."""


class DistributedError(SaeError):
    """A data-parallel run lost a rank (killed, crashed, out of memory) or its ranks disagree."""

    exit_code = 3


class PeerFailed(DistributedError):
    """Another rank failed while this one did not (that rank reports its own error)."""


class Collective:
    """One process: ``rank`` 0 of ``world`` 1; every operation returns its input unchanged."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        """Whether more than one rank takes part (otherwise nothing is communicated)."""
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes run directories, metrics and checkpoints (rank 0)."""
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place; returns ``t``."""
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum over the ranks, in place; returns ``t``."""
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over the ranks, in place; returns ``t``."""
        return t

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (``[n_r, ...]``; ``n_r`` may differ) concatenated in rank order."""
        return t

    def grads_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the ranks' gradients of ``params`` in place (a missing gradient counts as zeros)."""

    def gather_codes(self, codes: SparseCodes, fixed_width: bool = False) -> SparseCodes:
        """The codes of the whole global batch, detached, rows in rank order (this rank's own rows
        at ``[rank·b, (rank+1)·b)``): padded ``[B, K]`` when ``fixed_width`` (every rank's codes are
        ``[b, K]`` with one ``K``, e.g. TopK's: no host read), else ragged (one host read for the sizes)."""
        return codes

    def all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (every rank must call it at the same point)."""
        return ok

    def close(self) -> None:
        """Leave the process group (nothing for one process)."""


LOCAL = Collective()
"""The single-process collective."""


class TorchCollective(Collective):
    """``torch.distributed`` over the default process group (already initialised)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as e:  # gloo/NCCL: a peer closed its connection, or a timeout
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise DistributedError(f"rank {self.rank} of {self.world} lost contact with another rank during "
                                   f"{what} ({first[:160]})") from None

    def _to(self, t: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``t`` on the backend's device (gloo: CPU; NCCL: CUDA), and whether it was moved."""
        if t.device == self.device:
            return t, False
        return t.to(self.device), True

    def _reduce(self, t: torch.Tensor, op: object, what: str) -> torch.Tensor:
        u, moved = self._to(t)
        self._call(what, lambda: self._dist.all_reduce(u, op=op))
        if moved:
            t.copy_(u)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, self._dist.ReduceOp.SUM, "a sum")

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, self._dist.ReduceOp.MIN, "a minimum")

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, self._dist.ReduceOp.MAX, "a maximum")

    def _gather_same(self, t: torch.Tensor) -> list[torch.Tensor]:
        u, _ = self._to(t.contiguous())
        out = [torch.empty_like(u) for _ in range(self.world)]
        self._call("a gather", lambda: self._dist.all_gather(out, u))
        return [o.to(t.device) for o in out]

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        n = torch.tensor([t.shape[0]], dtype=torch.int64)
        sizes = [int(s) for s in self._gather_same(n)]  # one host read: variable sizes need it
        width = max(sizes)
        pad = t.new_zeros((width, *t.shape[1:]))
        pad[: t.shape[0]] = t
        parts = self._gather_same(pad)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    def grads_(self, params: Iterable[torch.nn.Parameter]) -> None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.sum_(p.grad)

    def gather_codes(self, codes: SparseCodes, fixed_width: bool = False) -> SparseCodes:
        b = codes.batch
        if fixed_width:
            return SparseCodes(torch.cat(self._gather_same(codes.vals.detach())),
                               torch.cat(self._gather_same(codes.idx)))
        rows, lat, vals = codes.entries()
        rows = rows + self.rank * b
        return SparseCodes.ragged(self.cat(rows), self.cat(lat), self.cat(vals.detach()), b * self.world)

    def all_ok(self, ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        return bool(self.min_(flag))

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def from_env(device: str) -> Collective:
    """:data:`LOCAL`, or — when ``torchrun`` started this process (``WORLD_SIZE`` > 1) — a
    :class:`TorchCollective` on the default process group, joined here if it is not yet (gloo when
    ``device`` is the CPU, NCCL with ``cuda:LOCAL_RANK`` for CUDA).

    Raises:
        ConfigError: ``WORLD_SIZE`` > 1 without the rest of torchrun's environment.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return LOCAL
    import torch.distributed as dist

    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set: start data-parallel training "
                          "with `torchrun --nproc-per-node N -m sae train ...` or `sae train --nproc N ...`")
    if not dist.is_initialized():
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise ConfigError(f"rank {os.environ['RANK']} is local rank {local}, but only "
                                  f"{torch.cuda.device_count()} GPUs are visible: start at most one rank per GPU")
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        except RuntimeError as e:  # a rank died while the group formed
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
            raise DistributedError(f"rank {os.environ['RANK']} of {world} could not join the other ranks "
                                   f"({first[:160]}); rerun the same command") from None
    return TorchCollective()


def rank_device(device: torch.device, dist: Collective) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run under torchrun, else ``device``."""
    if dist.active and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


__all__ = ["LOCAL", "Collective", "DistributedError", "PeerFailed", "TorchCollective", "from_env", "rank_device"]
