"""The training loop: store → shuffled batches → one or more :class:`Trainer` s → run directories.

A run directory holds ``sae_weights.safetensors`` + ``cfg.json`` (SAELens layout, extended),
``metrics.jsonl`` (one JSON object per logged step) and, while training, ``checkpoint.pt``
(trainer/optimiser/penalty state, step, RNG, store cursor, metrics offset). Several trainers can
consume one batch stream (:func:`train_many`): each batch is read and decompressed once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import __version__
from ..errors import ConfigError, Interrupted, NonFiniteError, SaeError
from ..model import layer_of_hook, resolve_device
from ..outputs import RUN_MARKER, OutputBuild, is_empty_dir, is_sae_run
from ..progress import progress_bar
from ..rundir.format import CFG_FILE, CHECKPOINT_FILE, METRICS_FILE, PENALTY_STATE_FILE, WEIGHTS_FILE
from ..rundir.sae import SAE
from ..store import ActivationStore, ShuffledBatches, StoreError
from ..tracking import RunTrackers, TrackingConfig, run_tags
from .archs import arch_class, make_arch_config
from .collective import LOCAL, Collective, DistributedError, PeerFailed, from_env, rank_device
from .config import TrainConfig
from .host_memory import keep_freed_memory
from .init_from import load_init_source
from .trainer import Trainer

TEST_DELAY_ENV = "SAE_TRAIN_STEP_DELAY_S"
"""Test hook: seconds every training step sleeps (lets a test kill a rank of a running job)."""
DATA_KEYS = ("store", "hook_name", "batch_size", "tokens", "seed", "mix_chunks", "normalize", "device",
             "storage_options", "cache")


class RunDirError(SaeError):
    """A run directory exists (without --resume/--overwrite), is not ours, or cannot be resumed."""


def run_settings(cfg: TrainConfig, store: ActivationStore, hook: str) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: :meth:`TrainConfig.run_settings` plus the
    store's identity (id and rows), the resolved hook and ``d_in``."""
    return {**cfg.run_settings(), "store_id": store.attrs.get("store_id"), "store_rows": store.n_tokens,
            "hook_digest": store.hook_digest(hook) or store.content_digest, "hook_name": hook, "d_in": store.d_model}


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    if old.get("variant") in ("topk", "relu"):  # checkpoints written when the base architecture was a variant
        old = {**old, "variant": "none"}
    if isinstance(old.get("arch_params"), dict) and "variant" in old["arch_params"]:  # JumpReLU's old field name
        ap = dict(old["arch_params"])
        ap["sparsity_loss"] = ap.pop("variant")
        old = {**old, "arch_params": {k: ap[k] for k in new.get("arch_params", ap) if k in ap}}
    for key in new:
        if key in old and json.dumps(old[key], sort_keys=True) != json.dumps(new[key], sort_keys=True):
            return key
    return None


def _finite(trainer: Trainer) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in trainer.sae.parameters())


class _Run:
    """Book-keeping of one trainer inside the loop: its directory (built in place, in a staging
    sibling for ``--overwrite``, or resumed), metrics file, checkpoints and final save."""

    def __init__(self, cfg: TrainConfig, store: ActivationStore, hook: str, scale: float, steps: int,
                 device: torch.device, init: tuple[SAE, dict[str, Any]] | None = None,
                 tracking: TrackingConfig | None = None, dist: Collective = LOCAL) -> None:
        self.cfg, self.path = cfg, Path(cfg.out)
        self.writer = dist.is_writer  # data-parallel: rank 0 writes; the others only read a checkpoint
        self.settings = run_settings(cfg, store, hook)
        self.init_provenance = init[1] if init is not None else None
        self.trackers: RunTrackers | None = None
        # the source SAE by content: a resume with another (or no) --init-from is refused; a moved one is not
        self.settings["init_from_sha256"] = init[1]["weights_sha256"] if init is not None else None
        self.build: OutputBuild | None = None
        self.finished = False
        self.failed: str | None = None
        self.last_checkpoint_step: int | None = None
        state = self._open() if self.writer else self._open_reader()  # validates; creates nothing yet
        self.trainer = Trainer(cfg, store.d_model, steps, b_dec_init=store.mean(hook) * scale, device=device,
                               dist=dist)
        if init is not None and state is None:
            self.trainer.init_from_sae(init[0])
        self.rows_consumed = 0
        self.metrics = None
        if self.finished:
            return
        if not self.writer:
            if state is not None:
                self._restore(state)
            return
        if self.build is not None:  # fresh or overwrite: create the (staging) directory now
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / RUN_MARKER).write_text(json.dumps({"sae_version": __version__, "created": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        metrics = self.dir / METRICS_FILE
        replayed_through = -1  # the last step the killed process logged (its trackers may hold it)
        if state is not None:
            self._restore(state)
            with metrics.open("a+b") as fh:  # drop lines logged after the checkpoint
                fh.seek(int(state["metrics_bytes"]))
                replayed_through = _last_logged_step(fh.read())
                fh.truncate(int(state["metrics_bytes"]))
        else:
            metrics.write_text("")
        self.metrics = metrics.open("a")
        if tracking is not None:
            tags = run_tags(cfg.activation, cfg.variant, cfg.model_seed, hook)
            config = {**self.settings, "store_url": str(store.path), "content_digest": store.content_digest}
            resume = state.get("tracking") if state is not None else None
            self.trackers = RunTrackers.start(tracking, tracking.name or self.path.name, config, tags, resume=resume,
                                              replayed_through=replayed_through)

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.trainer.load_checkpoint_state(state["trainer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise RunDirError(f"cannot resume {self.path}: its {CHECKPOINT_FILE} does not fit this run "
                              f"({str(e).splitlines()[0]}); use --overwrite to start over") from None
        self.rows_consumed = int(state["rows_consumed"])
        self.last_checkpoint_step = self.trainer.step_idx
        torch.set_rng_state(state["torch_rng"])

    def _open_reader(self) -> dict[str, Any] | None:
        """A data-parallel rank other than 0: the checks rank 0 makes (the same errors), and the
        checkpoint to resume from; it never writes to the run directory (``check_run_dir`` ran on every
        rank before rank 0 created anything)."""
        path = self.path
        if not (self.cfg.resume and path.exists() and not is_empty_dir(path)):
            return None
        if (path / CHECKPOINT_FILE).exists():
            return self._read_checkpoint()
        self.finished = (path / WEIGHTS_FILE).exists() and (path / CFG_FILE).exists()
        return None

    def _read_checkpoint(self) -> dict[str, Any]:
        """``checkpoint.pt`` of this run, checked against this run's settings. Raises ``RunDirError``."""
        try:
            state = torch.load(self.path / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise RunDirError(f"cannot resume {self.path}: {CHECKPOINT_FILE} is unreadable "
                              f"({e.__class__.__name__}); use --overwrite to start over") from None
        self._check_settings(state.get("settings"), "its checkpoint")
        return state

    @property
    def dir(self) -> Path:
        """Where this run writes now (a staging sibling while an ``--overwrite`` is in progress)."""
        return self.build.target if self.build is not None else self.path

    def _open(self) -> dict[str, Any] | None:
        """Decide fresh / overwrite / resume / finished for ``self.path``; return the checkpoint state
        to resume from. Raises ``RunDirError`` for an existing path that may not be touched."""
        cfg, path = self.cfg, self.path
        exists = path.exists() and not is_empty_dir(path)
        if exists and cfg.resume:
            if not is_sae_run(path):
                raise RunDirError(f"{path} exists and is not an sae run directory; refusing to resume it "
                                  "(pick another --out)")
            if (path / CHECKPOINT_FILE).exists():
                return self._read_checkpoint()
            if (path / WEIGHTS_FILE).exists() and (path / CFG_FILE).exists():
                try:
                    old = json.loads((path / CFG_FILE).read_text()).get("run_settings")
                except ValueError:
                    old = None
                self._check_settings(old, CFG_FILE)
                self.finished = True  # already finished: nothing to do
                return None
            # killed before its first checkpoint: nothing to resume; start again in place (the metrics
            # file is rewritten, a stale checkpoint temporary removed; nothing else is touched)
            (path / (CHECKPOINT_FILE + ".tmp")).unlink(missing_ok=True)
            return None
        self.build = OutputBuild(path, overwrite=cfg.overwrite, is_ours=is_sae_run, what="an sae run directory",
                                 keep_partial=lambda: (self.dir / CHECKPOINT_FILE).exists(), error=RunDirError)
        return None

    def _check_settings(self, old: dict[str, Any] | None, source: str) -> None:
        if not old:
            return  # written by an older version: nothing recorded to compare
        key = _first_difference(old, self.settings)
        if key is not None:
            raise RunDirError(f"cannot resume {self.path}: {key} was {old[key]!r} in {source}, now "
                              f"{self.settings[key]!r}; rerun with the original setting, or --overwrite to start over")

    def log(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        assert self.metrics is not None
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.trackers is not None:  # after metrics.jsonl, the source of truth; guarded (never raises)
            self.trackers.log(record, int(record["step"]))

    def close_trackers(self, ok: bool = True) -> dict[str, Any]:
        """Finish the tracker runs (``ok=False``: stopped early); their refs for ``cfg.json`` (empty when
        nothing is tracked)."""
        refs = self.trackers.finish(ok) if self.trackers is not None else {}
        self.trackers = None
        return refs

    def checkpoint(self, rows_consumed: int) -> None:
        """Write ``checkpoint.pt`` atomically (temporary file + rename). Non-finite weights are never
        checkpointed: the run fails instead and the previous checkpoint stays."""
        if not _finite(self.trainer):
            self.fail(f"weights are not finite at step {self.trainer.step_idx}")
            return
        if not self.writer:
            self.last_checkpoint_step = self.trainer.step_idx
            return
        assert self.metrics is not None
        self.metrics.flush()
        state = {"trainer": self.trainer.checkpoint_state(), "rows_consumed": rows_consumed,
                 "metrics_bytes": self.metrics.tell(), "torch_rng": torch.get_rng_state(),
                 "settings": self.settings,
                 "tracking": self.trackers.refs() if self.trackers is not None else {}}
        path = self.dir / CHECKPOINT_FILE
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        self.last_checkpoint_step = self.trainer.step_idx

    def fail(self, why: str) -> None:
        kept = (f"its last good checkpoint (step {self.last_checkpoint_step}) is kept"
                if self.last_checkpoint_step is not None else "no checkpoint was written, nothing is kept")
        self.failed = (f"training {self.path} diverged: {why}; {kept}. Lower --lr, or check the store for "
                       "NaN/inf activations")
        self.abort()

    def finish(self, cfg_dict: dict[str, Any], scale: float) -> None:
        """Save the final SAE (folded to raw units), penalty state; drop the checkpoint; swap into place."""
        if not _finite(self.trainer):
            self.fail("final weights are not finite")
            return
        if not self.writer:
            return
        trained = self.trainer.inference_sae()
        sae = trained.folded(scale)
        unit = sae.with_unit_decoder() if self.trainer.cfg.save_unit_decoder else None
        sae = unit if unit is not None else sae
        arch_cfg = dict(trained.cfg)
        if "batchtopk_threshold" in arch_cfg:  # θ as saved (raw units, unit decoder); training units kept beside
            arch_cfg["batchtopk_threshold_train_units"] = arch_cfg["batchtopk_threshold"]
            arch_cfg["batchtopk_threshold"] = float(sae.threshold[0])
        if self.init_provenance is not None:
            cfg_dict = {**cfg_dict, "init_from": self.init_provenance}
        refs = self.close_trackers()
        if refs:
            cfg_dict = {**cfg_dict, "tracking": refs}
        sae.save(self.dir, {**cfg_dict, **arch_cfg, "unit_decoder": unit is not None,
                            "arch_config": dataclasses.asdict(self.trainer.arch.config)})
        pen_state = {k: v.detach().cpu().contiguous() for k, v in self.trainer.penalty.state_dict().items()}
        if pen_state:  # final variant state (groups, EMAs...) for analysis, e.g. the geometry eval
            save_file(pen_state, str(self.dir / PENALTY_STATE_FILE))
        assert self.metrics is not None
        self.metrics.close()
        self.metrics = None
        (self.dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        if self.build is not None:
            self.build.commit()

    def abort(self) -> None:
        """Stop without final files: trackers closed as stopped early, metrics closed, a build dropped."""
        self.close_trackers(ok=False)
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.build is not None:
            self.build.abort()


def check_run_dir(cfg: TrainConfig) -> None:
    """The checks :func:`train_many` makes of ``cfg.out`` before it creates anything, made alone and with
    no side effect (a distributed sweep makes them in the coordinating process before any task runs).

    Raises:
        RunDirError: ``cfg.out`` exists and is not empty without ``--resume``/``--overwrite``, or it is
            not an sae run directory (which neither flag may touch).
    """
    path = Path(cfg.out)
    if not path.exists() or is_empty_dir(path):
        return
    if not (cfg.resume or cfg.overwrite):
        raise RunDirError(f"{path} already exists: pass --resume to continue it or --overwrite to replace it")
    if not is_sae_run(path):
        raise RunDirError(f"{path} exists and is not an sae run directory; refusing to "
                          f"{'resume' if cfg.resume else 'replace'} it (pick another --out)")


def sae_cfg_dict(cfg: TrainConfig, store: ActivationStore, hook: str, scale: float, steps: int,
                 penalty_config: Any, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``cfg.json`` fields besides the architecture (SAELens names first, then ours)."""
    a = store.attrs
    return {
        "model_name": a["model_id"], "model_weights": a.get("model_weights"), "model_revision": a.get("model_revision"),
        "model_fingerprint": a["model_fingerprint"], "hook_name": hook,
        "hook_layer": layer_of_hook(hook), "hook_head_index": None, "context_size": store.context_size,
        "dataset_path": a["dataset"], "prepend_bos": True, "normalize_activations": "none",
        "activation_scale_folded": scale, "device": "cpu", "sae_lens_training_version": None,
        "variant": cfg.variant, "variant_config": dataclasses.asdict(penalty_config),
        "store_path": str(store.path), "store_url": str(store.path), "store_fingerprint": store.fingerprint,
        "store_id": a.get("store_id"), "content_digest": store.content_digest, "hook_digest": store.hook_digest(hook),
        "store_rows": store.n_tokens,
        "store_format_version": store.format_version,
        "trained_rows": steps * cfg.batch_size, "training_tokens": steps * cfg.batch_size, "training_steps": steps,
        "train_config": {k: v for k, v in cfg.to_dict().items() if k != "storage_options"},
        "run_settings": settings, "sae_version": __version__,
    }


def _check_shareable(cfgs: list[TrainConfig]) -> None:
    """Every config valid, all agreeing on :data:`DATA_KEYS`, each with its own ``--out``.

    Raises:
        ConfigError: naming the first problem.
    """
    if not cfgs:
        raise ConfigError("nothing to train: no configurations")
    for c in cfgs:
        c.validate()
    first = cfgs[0]
    for c in cfgs[1:]:
        bad = [k for k in DATA_KEYS if getattr(c, k) != getattr(first, k)]
        if bad:
            raise ConfigError(f"configs differ in {bad[0]!r}: they cannot share one pass over the store")
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) != len(outs):
        raise ConfigError("two configurations share one --out directory: give each its own")


def train_many(cfgs: list[TrainConfig], quiet: bool = False, label: str = "train",
               on_progress: Callable[[int], None] | None = None,
               tracking: TrackingConfig | None = None, dist: Collective | None = None) -> list[Path]:
    """Train several SAEs from ONE pass over the store (each batch read once, fed to all).

    All configs must agree on :data:`DATA_KEYS` (store, hook, batch size, tokens, seed, mixing,
    normalisation, device). Every config, the store and every run directory are checked before
    anything is created. SIGTERM/SIGINT checkpoint every run and raise :class:`Interrupted`; a run
    whose loss or weights become non-finite stops (its last good checkpoint kept) while the others
    finish, then :class:`NonFiniteError` is raised. Returns the run directories.
    ``on_progress(rows)``, if given, is called after every step with the rows of the pass done so far
    (a distributed sweep forwards it to the coordinating process). ``tracking``: experiment trackers
    that receive each run's settings and logged records (:mod:`sae.tracking`).

    Data-parallel (``dist``, by default :func:`~sae.train.collective.from_env`: several ranks when
    started by ``torchrun``): each rank trains on its equal share of every global batch of
    ``batch_size`` rows, the same stream as one process; gradients and the global statistics are
    summed over the ranks (:mod:`sae.train.collective`); rank 0 alone writes run directories, metrics,
    checkpoints and trackers. A checkpoint resumes with any number of ranks.

    Raises:
        ConfigError: a bad option. StoreError: missing/incomplete/empty store or hook.
        RunDirError: existing, foreign or mismatching run dir. NonFiniteError, Interrupted.
        DistributedError: a rank was lost (its last checkpoint kept) or the ranks diverged.
    """
    _check_shareable(cfgs)
    if tracking is not None:
        tracking.check_runs(len(cfgs))
    first = cfgs[0]
    own_dist = dist is None
    dist = from_env(first.device) if dist is None else dist
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    if delay:
        inner = on_progress

        def on_progress(rows: int) -> None:
            time.sleep(delay)
            if inner is not None:
                inner(rows)

    try:
        return _train_many(cfgs, quiet or not dist.is_writer, label, on_progress,
                           tracking if dist.is_writer else None, dist)
    finally:
        if own_dist:
            dist.close()


def _train_many(cfgs: list[TrainConfig], quiet: bool, label: str, on_progress: Callable[[int], None] | None,
                tracking: TrackingConfig | None, dist: Collective) -> list[Path]:
    first = cfgs[0]
    if first.batch_size % dist.world:
        raise ConfigError(f"--batch-size {first.batch_size} cannot be split into {dist.world} equal parts: "
                          f"use a multiple of {dist.world} (the number of ranks)")
    store = ActivationStore(first.store, storage_options=first.storage_options, cache=first.cache)
    hook = store.default_hook(first.hook_name)
    if store.n_tokens == 0:
        raise StoreError(f"{store.path} holds no tokens: harvest into it again (`sae harvest --out {store.path}`)")
    device = rank_device(resolve_device(first.device), dist)
    if device.type == "cpu":
        keep_freed_memory()  # ~13 % faster CPU steps (train/host_memory.py)
    for c in cfgs:
        d_sae = c.d_sae or c.expansion * store.d_model
        arch_class(c.activation).check(store.d_model, d_sae, c.k, make_arch_config(c.activation, c.arch_params))
    scale = store.norm_scale(hook) if first.normalize else 1.0
    if not math.isfinite(scale) or scale <= 0:
        raise StoreError(f"{store.path}: the statistics of {hook} are not finite (E‖x‖² = "
                         f"{store.mean_sq_norm(hook)}); re-harvest it")
    steps = first.tokens // first.batch_size
    inits = {i: load_init_source(c, store, hook, scale) for i, c in enumerate(cfgs) if c.init_from is not None}
    loader = ShuffledBatches(store, hook, first.batch_size, seed=first.seed, mix_chunks=first.mix_chunks,
                             start_row=0, scale=scale, device=device, read_workers=first.read_workers,
                             part=(dist.rank, dist.world))  # raises before any run dir exists
    runs: list[_Run] = []
    # data-parallel: every rank checks the run directories before rank 0 creates any of them
    _on_every_rank(dist, lambda: [check_run_dir(c) for c in cfgs])
    try:
        _on_every_rank(dist, lambda: runs.extend(_Run(c, store, hook, scale, steps, device, inits.get(i), tracking,
                                                      dist) for i, c in enumerate(cfgs)))
        active = [r for r in runs if not r.finished]
        if active:
            cursors = {r.rows_consumed for r in active}
            if len(cursors) > 1:
                raise RunDirError("runs of this sweep were checkpointed at different steps; resume them separately")
            loader.rows_consumed = cursors.pop()
            try:
                _loop(active, loader, steps, quiet, label, on_progress)
            except DistributedError as e:
                kept = [f"{r.path} at step {r.last_checkpoint_step}" for r in active
                        if r.last_checkpoint_step is not None]
                where = (f"the last checkpoint is kept ({', '.join(kept)}): rerun the same command with --resume "
                         "(any number of ranks)" if kept else "no checkpoint had been written: rerun the same command")
                raise DistributedError(f"{e}; the run stopped, {where}") from None
        _close_trackers_together(runs)
        for r in runs:
            if not r.finished and r.failed is None:
                r.finish(sae_cfg_dict(r.cfg, store, hook, scale, steps, r.trainer.penalty.config, r.settings), scale)
    except BaseException:
        _close_trackers_together(runs, ok=False)
        for r in runs:
            if not r.finished and r.failed is None:
                r.abort()  # trackers, metrics file, staging copy
            else:
                r.close_trackers()
        raise
    failed = [r.failed for r in runs if r.failed]
    if failed:
        raise NonFiniteError(failed[0] + (f" (and {len(failed) - 1} more run(s))" if len(failed) > 1 else ""))
    return [r.path for r in runs]


def _close_trackers_together(runs: list[_Run], ok: bool = True) -> None:
    """End every run's tracker runs at once, so a sweep waits one ``timeout_s`` at most in all (each
    ``finish`` then waits for the same deadline). A run is closed as stopped early unless it finished or
    ``ok`` and its weights are finite (else :meth:`_Run.finish` fails it)."""
    for r in runs:
        if r.trackers is not None:
            r.trackers.close(r.finished or (ok and _finite(r.trainer)))


def _last_logged_step(tail: bytes) -> int:
    """The ``step`` of the last complete ``metrics.jsonl`` line in ``tail`` (-1 if none)."""
    for line in reversed(tail.split(b"\n")):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return -1


def _on_every_rank(dist: Collective, fn: Callable[[], Any]) -> None:
    """Run ``fn``; go on only if it succeeded on every rank (raise its error here, else
    :class:`PeerFailed`). One process: just ``fn()``."""
    if not dist.active:
        fn()
        return
    failure: BaseException | None = None
    try:
        fn()
    except (SaeError, OSError) as e:
        failure = e
    if not dist.all_ok(failure is None):
        raise failure or PeerFailed("another rank failed while setting up the run (its own error line says why; "
                                    "SAE_DEBUG=1 shows every rank's)")


class _Signals:
    """Record SIGTERM/SIGINT during the loop instead of dying, so the loop can checkpoint first.
    Only in the main thread (signal handlers cannot be set elsewhere, e.g. in dask worker threads)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _loop(runs: list[_Run], loader: ShuffledBatches, steps: int, quiet: bool, label: str,
          on_progress: Callable[[int], None] | None = None) -> None:
    cfg = runs[0].cfg
    step0 = runs[0].trainer.step_idx
    t0 = time.perf_counter()
    last_ckpt = time.monotonic()
    with progress_bar(quiet) as bar, _Signals() as signals:
        task = bar.add_task(label, total=steps * cfg.batch_size, completed=step0 * cfg.batch_size)
        batches = iter(loader)
        desc = label
        for step in range(step0, steps):
            live = [r for r in runs if r.failed is None]
            if not live:
                return
            x = next(batches)
            logs: dict[str, Any] = {}
            for r in live:
                last = step == steps - 1
                log_step = step % r.cfg.log_every == 0 or last
                logs = r.trainer.step(x, sync=log_step)  # no host read on other steps (GPU stays busy)
                if log_step:
                    if not math.isfinite(logs["loss"]):
                        r.fail(f"the loss is {logs['loss']} at step {step}")
                        continue
                    record = {"step": step, "tokens": (step + 1) * cfg.batch_size,
                              "elapsed_s": round(time.perf_counter() - t0, 3), **logs}
                    diag = r.trainer.penalty.diagnostics(r.trainer.sae.W_dec.detach())
                    record.update({f"penalty/{k}": v for k, v in diag.items()})
                    r.log(record)
                if (step + 1) % r.cfg.checkpoint_every == 0 and not last:
                    r.checkpoint(loader.rows_consumed)
            last = step == steps - 1
            if not last and (signals.signum is not None
                             or time.monotonic() - last_ckpt >= 60 * min(r.cfg.checkpoint_minutes for r in live)):
                for r in live:
                    if r.failed is None and r.trainer.step_idx != r.last_checkpoint_step:
                        r.checkpoint(loader.rows_consumed)
                last_ckpt = time.monotonic()
                if signals.signum is not None:
                    name = signal.Signals(signals.signum).name
                    raise Interrupted(f"{name} received: checkpoint saved at step {step + 1}/{steps} in "
                                      f"{', '.join(str(r.dir) for r in live)}; continue with the same command "
                                      "plus --resume", signals.signum)
            if len(runs) == 1 and "explained_variance" in logs:  # a log step: the values are on the host
                desc = f"{label} EV {logs['explained_variance']:.3f} L0 {logs['l0']:.0f}"
            bar.update(task, completed=(step + 1) * cfg.batch_size, description=desc)
            if on_progress is not None:
                on_progress((step + 1) * cfg.batch_size)


def train(cfg: TrainConfig, quiet: bool = False, tracking: TrackingConfig | None = None) -> Path:
    """Train one SAE (see :func:`train_many`) and return its run directory."""
    return train_many([cfg], quiet=quiet, label=f"train {cfg.variant}", tracking=tracking)[0]


__all__ = ["RunDirError", "check_run_dir", "train", "train_many"]
