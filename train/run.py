"""The training loop: store → shuffled batches → one or more :class:`Trainer` s → run directories.

A run directory holds ``sae_weights.safetensors`` + ``cfg.json`` (SAELens layout, extended),
``metrics.jsonl`` (one JSON object per logged step) and, while training, ``checkpoint.pt``
(trainer/optimiser/penalty state, step, RNG, store cursor, metrics offset). Several trainers can
consume one batch stream (:func:`train_many`): each batch is read and decompressed once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import __version__
from ..model import layer_of_hook, resolve_device
from ..progress import progress_bar
from ..store import ActivationStore, ShuffledBatches
from .config import TrainConfig
from .sae import CFG_FILE, WEIGHTS_FILE
from .trainer import Trainer

CHECKPOINT_FILE = "checkpoint.pt"
PENALTY_STATE_FILE = "penalty_state.safetensors"
METRICS_FILE = "metrics.jsonl"
DATA_KEYS = ("store", "hook_name", "batch_size", "tokens", "seed", "mix_chunks", "normalize", "device")


class RunDirError(ValueError):
    """A run directory exists (without --resume/--overwrite) or cannot be resumed."""


def _prepare_run_dir(cfg: TrainConfig) -> Path | None:
    """Create/validate ``cfg.out``; return the checkpoint path to resume from, if any."""
    run_dir = Path(cfg.out)
    ckpt = run_dir / CHECKPOINT_FILE
    if run_dir.exists() and any(run_dir.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(run_dir)
        elif cfg.resume:
            if ckpt.exists():
                return ckpt
            if (run_dir / WEIGHTS_FILE).exists():
                return None  # already finished; train_many skips it
            raise RunDirError(f"cannot resume {run_dir}: it has no {CHECKPOINT_FILE} (use --overwrite to restart)")
        else:
            raise RunDirError(f"{run_dir} already exists: pass --resume to continue it or --overwrite to replace it")
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Run:
    """Book-keeping of one trainer inside the loop (run dir, metrics file, resume state)."""

    def __init__(self, cfg: TrainConfig, store: ActivationStore, hook: str, scale: float, steps: int,
                 device: torch.device) -> None:
        self.cfg, self.dir = cfg, Path(cfg.out)
        ckpt = _prepare_run_dir(cfg)
        self.finished = (self.dir / WEIGHTS_FILE).exists() and ckpt is None and cfg.resume
        b_dec = store.mean(hook) * scale
        self.trainer = Trainer(cfg, store.d_model, steps, b_dec_init=b_dec, device=device)
        self.rows_consumed = 0
        metrics = self.dir / METRICS_FILE
        if ckpt is not None:
            state = torch.load(ckpt, map_location=device, weights_only=False)
            self.trainer.load_checkpoint_state(state["trainer"])
            self.rows_consumed = int(state["rows_consumed"])
            torch.set_rng_state(state["torch_rng"])
            with metrics.open("r+b") as fh:  # drop lines logged after the checkpoint
                fh.truncate(int(state["metrics_bytes"]))
        elif not self.finished:
            metrics.write_text("")
        self.metrics = metrics.open("a") if not self.finished else None

    def log(self, record: dict[str, Any]) -> None:
        assert self.metrics is not None
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def checkpoint(self, rows_consumed: int) -> None:
        assert self.metrics is not None
        self.metrics.flush()
        _atomic_save({"trainer": self.trainer.checkpoint_state(), "rows_consumed": rows_consumed,
                      "metrics_bytes": self.metrics.tell(), "torch_rng": torch.get_rng_state()},
                     self.dir / CHECKPOINT_FILE)


def sae_cfg_dict(cfg: TrainConfig, store: ActivationStore, hook: str, scale: float, steps: int,
                 penalty_config: Any) -> dict[str, Any]:
    """The ``cfg.json`` fields besides the architecture (SAELens names first, then ours)."""
    a = store.attrs
    return {
        "model_name": a["model_id"], "model_fingerprint": a["model_fingerprint"], "hook_name": hook,
        "hook_layer": layer_of_hook(hook), "hook_head_index": None, "context_size": store.context_size,
        "dataset_path": a["dataset"], "prepend_bos": True, "normalize_activations": "none",
        "activation_scale_folded": scale, "device": "cpu", "sae_lens_training_version": None,
        "variant": cfg.variant, "variant_config": dataclasses.asdict(penalty_config),
        "store_path": str(store.path), "store_fingerprint": store.fingerprint,
        "training_tokens": steps * cfg.batch_size, "training_steps": steps,
        "train_config": cfg.to_dict(), "sae_version": __version__,
    }


def train_many(cfgs: list[TrainConfig], quiet: bool = False, label: str = "train") -> list[Path]:
    """Train several SAEs from ONE pass over the store (each batch read once, fed to all).

    All configs must agree on :data:`DATA_KEYS` (store, hook, batch size, tokens, seed, mixing,
    normalisation, device). Returns the run directories.

    Raises:
        StoreError: missing/incomplete store or hook. RunDirError: existing run dir.
        ValueError: configs that cannot share a pass.
    """
    first = cfgs[0]
    for c in cfgs[1:]:
        bad = [k for k in DATA_KEYS if getattr(c, k) != getattr(first, k)]
        if bad:
            raise ValueError(f"configs differ in {bad[0]!r}: they cannot share one pass over the store")
    store = ActivationStore(first.store)
    hook = store.default_hook(first.hook_name)
    device = resolve_device(first.device)
    scale = store.norm_scale(hook) if first.normalize else 1.0
    steps = first.tokens // first.batch_size
    if steps < 1:
        raise ValueError(f"--tokens {first.tokens} is less than one batch of {first.batch_size}")
    runs = [_Run(c, store, hook, scale, steps, device) for c in cfgs]
    active = [r for r in runs if not r.finished]
    if active:
        cursors = {r.rows_consumed for r in active}
        if len(cursors) > 1:
            raise RunDirError("runs of this sweep were checkpointed at different steps; resume them separately")
        start = cursors.pop()
        loader = ShuffledBatches(store, hook, first.batch_size, seed=first.seed, mix_chunks=first.mix_chunks,
                                 start_row=start, scale=scale, device=device)
        _loop(active, loader, steps, quiet, label)
    out = []
    for r in runs:
        if not r.finished:
            sae = r.trainer.sae.folded(scale)
            sae.save(r.dir, sae_cfg_dict(r.cfg, store, hook, scale, steps, r.trainer.penalty.config))
            pen_state = {k: v.detach().cpu().contiguous() for k, v in r.trainer.penalty.state_dict().items()}
            if pen_state:  # final variant state (groups, EMAs...) for analysis, e.g. the geometry eval
                save_file(pen_state, str(r.dir / PENALTY_STATE_FILE))
            assert r.metrics is not None
            r.metrics.close()
            (r.dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        out.append(r.dir)
    return out


def _loop(runs: list[_Run], loader: ShuffledBatches, steps: int, quiet: bool, label: str) -> None:
    cfg = runs[0].cfg
    step0 = runs[0].trainer.step_idx
    t0 = time.perf_counter()
    with progress_bar(quiet) as bar:
        task = bar.add_task(label, total=steps * cfg.batch_size, completed=step0 * cfg.batch_size)
        batches = iter(loader)
        for step in range(step0, steps):
            x = next(batches)
            for r in runs:
                logs = r.trainer.step(x)
                last = step == steps - 1
                if step % r.cfg.log_every == 0 or last:
                    record = {"step": step, "tokens": (step + 1) * cfg.batch_size,
                              "elapsed_s": round(time.perf_counter() - t0, 3), **logs}
                    diag = r.trainer.penalty.diagnostics(r.trainer.sae.W_dec.detach())
                    record.update({f"penalty/{k}": v for k, v in diag.items()})
                    r.log(record)
                if (step + 1) % r.cfg.checkpoint_every == 0 and not last:
                    r.checkpoint(loader.rows_consumed)
            desc = f"{label} EV {logs['explained_variance']:.3f} L0 {logs['l0']:.0f}" if len(runs) == 1 else label
            bar.update(task, completed=(step + 1) * cfg.batch_size, description=desc)


def train(cfg: TrainConfig, quiet: bool = False) -> Path:
    """Train one SAE (see :func:`train_many`) and return its run directory."""
    return train_many([cfg], quiet=quiet, label=f"train {cfg.variant}")[0]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["CFG_FILE", "CHECKPOINT_FILE", "METRICS_FILE", "RunDirError", "read_metrics", "train", "train_many"]
