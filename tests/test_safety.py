"""Nothing lost, nothing silently wrong: kills at chosen points, atomic overwrites, NaN guards,
honest resume, --config precedence, determinism."""

from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file
from typer.testing import CliRunner

from sae.cli import app
from sae.errors import Interrupted, NonFiniteError
from sae.harvest import harvest as harvest_mod
from sae.harvest.harvest import HarvestConfig, harvest
from sae.outputs import STAGING_TAG
from sae.store import ActivationStore
from sae.train.config import TrainConfig
from sae.train.run import RunDirError, train, train_many
from sae.train.trainer import Trainer
from tests.helpers import planted_features, run_killed, tree_hash, write_store

REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("store_id", "created", "harvest_config")


def _harvest_cfg(model_dir: Path, out: Path, **kw) -> HarvestConfig:
    base = dict(layers=[1, 2], model=str(model_dir), tokens=5120, context_size=64, batch_size=8, dtype="bfloat16",
                chunk_tokens=1024, device="cpu", out=str(out))
    return HarvestConfig(**{**base, **kw})


def _assert_same_store(a_path: Path, b_path: Path) -> None:
    a, b = ActivationStore(a_path), ActivationStore(b_path)
    assert np.array_equal(a.tokens, b.tokens)
    for h in a.hook_names:
        assert np.array_equal(np.asarray(a.group[h][:]), np.asarray(b.group[h][:])), h
    strip = [{k: v for k, v in s.attrs.items() if k not in VOLATILE} for s in (a, b)]
    assert strip[0] == strip[1]  # statistics, cursor, status, identity: all equal


HARVEST_BODY = '''
    from sae.harvest.harvest import HarvestConfig, harvest
    model, out, overwrite = sys.argv[3], sys.argv[4], sys.argv[5] == "1"
    harvest(HarvestConfig(layers=[1, 2], model=model, tokens=5120, context_size=64, batch_size=8, dtype="bfloat16",
                          chunk_tokens=1024, device="cpu", out=out, overwrite=overwrite, resume=not overwrite,
                          storage_options=json.loads(os.environ.get("SAE_TEST_STORAGE_OPTIONS", "{}"))),
            quiet=True)
'''


def _killed_harvest(point: str, n: int, model_dir: Path, out: Path | str, overwrite: bool = False,
                    storage_options: dict | None = None) -> None:
    run_killed(HARVEST_BODY, point, n, model_dir, out, "1" if overwrite else "0",
               env={"SAE_TEST_STORAGE_OPTIONS": json.dumps(storage_options or {})})


@pytest.fixture(scope="module")
def ref_store(tmp_path_factory, tiny_lm, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    return harvest(_harvest_cfg(tiny_model_dir, out), loaded=tiny_lm, quiet=True)


# Commit objects in order: 1 = commits/tokens.json, then per chunk one per hook (2 hooks, 5 chunks: 11).
# Array writes: 1 = the whole token array, then one per (chunk, hook).
@pytest.mark.parametrize("point,n,rows", [("after_commit", 1, 0), ("after_commit", 4, 1024),
                                          ("before_commit", 4, 1024), ("mid_chunk", 6, 2048)])
def test_harvest_sigkilled_at_a_point_resumes_identical(point, n, rows, ref_store, tiny_lm, tiny_model_dir, tmp_path):
    out = tmp_path / "cut.zarr"
    _killed_harvest(point, n, tiny_model_dir, out)
    cut = ActivationStore(out, require_complete=False)
    assert cut.n_tokens == rows and cut.attrs["status"] == "in_progress" and "stats" not in cut.attrs
    assert (out / "lease.json").exists()  # the dead writer's lease: --resume takes it over
    harvest(_harvest_cfg(tiny_model_dir, out, resume=True), loaded=tiny_lm, quiet=True)
    _assert_same_store(ref_store, out)
    assert not (out / "lease.json").exists()


def test_harvest_killed_repeatedly_at_random_points_resumes_identical(ref_store, tiny_lm, tiny_model_dir, tmp_path):
    rng = np.random.default_rng(7)
    out = tmp_path / "cut.zarr"
    for _ in range(3):  # each resumed process is killed again, after a random number of commits
        _killed_harvest("after_commit", int(rng.integers(1, 4)), tiny_model_dir, out)
    assert ActivationStore(out, require_complete=False).attrs["status"] == "in_progress"
    harvest(_harvest_cfg(tiny_model_dir, out, resume=True), loaded=tiny_lm, quiet=True)
    _assert_same_store(ref_store, out)


def test_killed_overwrite_leaves_the_old_store(ref_store, tiny_lm, tiny_model_dir, tmp_path):
    out = tmp_path / "acts.zarr"
    harvest(_harvest_cfg(tiny_model_dir, out, tokens=2048), loaded=tiny_lm, quiet=True)
    before = tree_hash(out)
    _killed_harvest("after_commit", 4, tiny_model_dir, out, overwrite=True)
    # the replacement was built beside it; the dead overwriter's lease (held so that no other writer
    # could start meanwhile) is all it left, and is taken over at once (its process is gone)
    lease = json.loads((out / "lease.json").read_text())
    assert lease["purpose"] == "overwrite"
    (out / "lease.json").unlink()
    assert tree_hash(out) == before
    (out / "lease.json").write_text(json.dumps(lease))
    # a later overwrite cleans the dead process's staging copy, then swaps in the new store
    harvest(_harvest_cfg(tiny_model_dir, out, overwrite=True), loaded=tiny_lm, quiet=True)
    _assert_same_store(ref_store, out)
    assert not [p for p in tmp_path.iterdir() if STAGING_TAG in p.name]


def test_failed_overwrite_keeps_old_store_and_failed_new_harvest_leaves_nothing(tiny_lm, tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "acts.zarr"
    harvest(_harvest_cfg(tiny_model_dir, out, tokens=2048), loaded=tiny_lm, quiet=True)
    before = tree_hash(out)
    real = harvest_mod.forward_chunk
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device fell over")
        return real(*a, **k)

    monkeypatch.setattr(harvest_mod, "forward_chunk", flaky)
    with pytest.raises(RuntimeError, match="fell over"):
        harvest(_harvest_cfg(tiny_model_dir, out, overwrite=True), loaded=tiny_lm, quiet=True)
    assert tree_hash(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.zarr"]
    calls["n"] = 1  # the next call fails at once: a new harvest with nothing committed is removed
    with pytest.raises(RuntimeError):
        harvest(_harvest_cfg(tiny_model_dir, tmp_path / "new.zarr"), loaded=tiny_lm, quiet=True)
    assert not (tmp_path / "new.zarr").exists()


def test_harvest_never_commits_non_finite_activations(tiny_lm, tiny_model_dir, tmp_path, monkeypatch):
    real = harvest_mod.forward_chunk
    calls = {"n": 0}

    def poisoned(*a, **k):
        acts = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            acts[2][5, 3] = float("nan")
            acts[2][70, 0] = float("inf")
        return acts

    monkeypatch.setattr(harvest_mod, "forward_chunk", poisoned)
    out = tmp_path / "nan.zarr"
    with pytest.raises(NonFiniteError, match=r"2 rows of the chunk at rows 1024:2048 contain NaN or inf "
                                             r"\(first: row 1029\)"):
        harvest(_harvest_cfg(tiny_model_dir, out), loaded=tiny_lm, quiet=True)
    s = ActivationStore(out, require_complete=False)
    assert s.n_tokens == 1024 and s.attrs["status"] == "in_progress"  # chunk 1 never committed
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore(out)


def _nan_store(tmp_path: Path) -> tuple[Path, int]:
    """4 chunks of 1024 rows (16 BOS each); the chunk visited third in epoch 0 (mix_chunks=1) is NaN."""
    x, _ = planted_features(4096, d_in=16, n_features=32, seed=0)
    path = write_store(tmp_path / "nan.zarr", x, context_size=64, chunk_tokens=1024)
    order = np.random.default_rng([0, 0]).permutation(4)
    g = zarr.open_group(str(path), mode="r+")
    c = int(order[2])
    g["blocks.0.hook_resid_post"][c * 1024:(c + 1) * 1024] = np.nan  # as in a store written before the guard
    # ... whose commits then recorded those bytes (else the loader refuses the chunk as replaced)
    crc = struct.unpack("<I", (path / "blocks.0.hook_resid_post" / "c" / str(c) / "0").read_bytes()[-4:])[0]
    rec_path = path / "commits" / "blocks.0.hook_resid_post" / f"{c}.json"
    rec = json.loads(rec_path.read_text())
    rec["crc32c"][0] = crc
    rec_path.write_text(json.dumps(rec))
    index = json.loads((path / "commits" / "index.json").read_text())
    index["crc32c"]["blocks.0.hook_resid_post"][c] = crc
    (path / "commits" / "index.json").write_text(json.dumps(index))
    return path, c


def test_training_on_nan_stops_keeps_last_good_checkpoint_and_writes_no_weights(tmp_path):
    store, _ = _nan_store(tmp_path)
    cfg = TrainConfig(store=str(store), d_sae=32, k=4, batch_size=504, tokens=504 * 8, mix_chunks=1, normalize=False,
                      log_every=1, checkpoint_every=2, device="cpu", out=str(tmp_path / "run"))
    with pytest.raises(NonFiniteError, match=r"the loss is nan at step 4; its last good checkpoint \(step 4\)"):
        train(cfg, quiet=True)
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").exists() and not (run / "sae_weights.safetensors").exists()
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["trainer"]["model"].values() if v.is_floating_point())
    # without any checkpoint nothing is left behind, so the corrected retry is not refused
    cfg2 = TrainConfig(**{**cfg.to_dict(), "adam_betas": (0.9, 0.999), "checkpoint_every": 100,
                          "out": str(tmp_path / "run2")})
    with pytest.raises(NonFiniteError, match="no checkpoint was written"):
        train(cfg2, quiet=True)
    assert not (tmp_path / "run2").exists()


@pytest.fixture()
def small_store(tmp_path) -> Path:
    x, _ = planted_features(4096, d_in=16, n_features=32, seed=0)
    return write_store(tmp_path / "s.zarr", x, context_size=64, chunk_tokens=1024)


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(store=str(store), d_sae=64, k=4, batch_size=256, tokens=256 * 12, log_every=1,
                                 checkpoint_every=100, device="cpu", out=str(out)), **kw})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "sae_weights.safetensors"))


def _stop_at(monkeypatch, step: int, how: str) -> None:
    """Make the ``step``-th optimiser step send SIGTERM to this process (``how='signal'``) or die."""
    real = Trainer.step

    def step_fn(self, x, sync=True):
        out = real(self, x, sync)
        if self.step_idx == step:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise RuntimeError("node lost")
        return out

    monkeypatch.setattr(Trainer, "step", step_fn)


def test_sigterm_checkpoints_a_sweep_and_resume_is_bit_identical(small_store, tmp_path, monkeypatch):
    cfgs = [_cfg(small_store, tmp_path / "ref" / v, variant=v) for v in ("topk", "relu", "topk_pairs")]
    train_many(cfgs, quiet=True)
    cut = [_cfg(small_store, tmp_path / "cut" / v, variant=v) for v in ("topk", "relu", "topk_pairs")]
    _stop_at(monkeypatch, 5, "signal")
    with pytest.raises(Interrupted, match="SIGTERM received: checkpoint saved at step 5/12") as info:
        train_many(cut, quiet=True)
    assert info.value.exit_code == 143
    monkeypatch.undo()
    assert all((Path(c.out) / "checkpoint.pt").exists() for c in cut)
    train_many([TrainConfig(**{**c.to_dict(), "adam_betas": (0.9, 0.999), "resume": True}) for c in cut], quiet=True)
    for a, b in zip(cfgs, cut, strict=True):
        wa, wb = _weights(Path(a.out)), _weights(Path(b.out))
        assert all(torch.equal(wa[n], wb[n]) for n in wa), a.variant


def test_timed_checkpoints_save_work_between_step_checkpoints(small_store, tmp_path, monkeypatch):
    cfg = _cfg(small_store, tmp_path / "run", checkpoint_minutes=1e-9)
    _stop_at(monkeypatch, 7, "crash")
    with pytest.raises(RuntimeError, match="node lost"):
        train(cfg, quiet=True)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["trainer"]["step"] == 6


def test_resume_refuses_changed_settings_in_one_line(small_store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = _cfg(small_store, run, checkpoint_every=2)
    _stop_at(monkeypatch, 5, "crash")
    with pytest.raises(RuntimeError):
        train(cfg, quiet=True)
    monkeypatch.undo()
    before = tree_hash(run)
    for change, key in [({"lr": 3e-3}, "lr"), ({"seed": 1}, "seed"), ({"variant": "ortsae"}, "variant"),
                        ({"d_sae": 128}, "d_sae"), ({"variant_params": {}, "variant": "topk_pairs"}, "variant"),
                        ({"tokens": 256 * 20}, "tokens"), ({"batch_size": 128}, "batch_size")]:
        bad = TrainConfig(**{**cfg.to_dict(), "adam_betas": (0.9, 0.999), "resume": True, **change})
        with pytest.raises(RunDirError, match=rf"cannot resume .*: {key} was .* in its checkpoint, now") as e:
            train(bad, quiet=True)
        assert "\n" not in str(e.value)
    other = write_store(tmp_path / "other.zarr", planted_features(4096, d_in=16, n_features=32, seed=3)[0],
                        context_size=64, chunk_tokens=1024)
    with pytest.raises(RunDirError, match="store_id was"):
        train(TrainConfig(**{**cfg.to_dict(), "adam_betas": (0.9, 0.999), "resume": True, "store": str(other)}),
              quiet=True)
    assert tree_hash(run) == before
    train(TrainConfig(**{**cfg.to_dict(), "adam_betas": (0.9, 0.999), "resume": True}), quiet=True)
    train(_cfg(small_store, tmp_path / "ref", checkpoint_every=2), quiet=True)
    wa, wb = _weights(run), _weights(tmp_path / "ref")
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    cfg_json = json.loads((run / "cfg.json").read_text())
    assert cfg_json["run_settings"]["lr"] == cfg.lr and cfg_json["store_id"] == ActivationStore(small_store).attrs[
        "store_id"]


def test_train_overwrite_is_atomic(small_store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(_cfg(small_store, run), quiet=True)
    before = tree_hash(run)
    _stop_at(monkeypatch, 3, "crash")
    with pytest.raises(RuntimeError):
        train(_cfg(small_store, run, overwrite=True, lr=3e-3), quiet=True)
    monkeypatch.undo()
    assert tree_hash(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run", "s.zarr"]
    train(_cfg(small_store, run, overwrite=True, lr=3e-3), quiet=True)
    assert json.loads((run / "cfg.json").read_text())["train_config"]["lr"] == 3e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "s.zarr"]


def test_relu_training_is_deterministic_and_resume_exact(small_store, tmp_path, monkeypatch):
    """Two ReLU runs with one seed were 2e-4 apart (advanced-indexing backward adds in thread order)."""
    kw = dict(variant="relu", d_sae=256, tokens=256 * 40, checkpoint_every=7)
    train(_cfg(small_store, tmp_path / "a", **kw), quiet=True)
    train(_cfg(small_store, tmp_path / "b", **kw), quiet=True)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    _stop_at(monkeypatch, 23, "crash")
    with pytest.raises(RuntimeError):
        train(_cfg(small_store, tmp_path / "c", **kw), quiet=True)
    monkeypatch.undo()
    train(_cfg(small_store, tmp_path / "c", resume=True, **kw), quiet=True)
    wc = _weights(tmp_path / "c")
    assert all(torch.equal(wa[n], wc[n]) for n in wa)


def test_config_file_precedence_cli_over_toml_over_defaults(small_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "run.toml"
    toml.write_text('variant = "topk_pairs"\ntokens = 2048\nbatch_size = 256\nlr = 0.01\nd_sae = 64\nk = 4\n'
                    'device = "cpu"\n\n[topk_pairs]\nrho = 0.01\n')
    r = CliRunner().invoke(app, ["train", "--store", str(small_store), "--config", str(toml), "--quiet"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "runs" / "topk_pairs" / "cfg.json").read_text())
    tc = cfg["train_config"]
    assert (cfg["variant"], tc["tokens"], tc["batch_size"], tc["lr"]) == ("topk_pairs", 2048, 256, 0.01)
    assert cfg["variant_config"]["rho"] == 0.01 and tc["seed"] == 0 and tc["k"] == 4  # default kept, TOML k
    r = CliRunner().invoke(app, ["train", "--store", str(small_store), "--config", str(toml), "--lr", "0.002",
                                 "-p", "rho=0.05", "--out", "runs/cli", "--quiet"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "runs" / "cli" / "cfg.json").read_text())
    assert cfg["train_config"]["lr"] == 0.002 and cfg["variant_config"]["rho"] == 0.05
    assert cfg["train_config"]["tokens"] == 2048  # not given on the command line: the file's value


def test_overwrite_of_foreign_dir_through_library_is_refused(tmp_path, tiny_lm, tiny_model_dir, small_store):
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="not an sae store; refusing to delete it"):
        harvest(_harvest_cfg(tiny_model_dir, d, overwrite=True), loaded=tiny_lm, quiet=True)
    assert (d / "thesis.tex").read_text() == "x"
    with pytest.raises(ValueError, match="not an sae run directory"):
        train(_cfg(small_store, d, overwrite=True), quiet=True)
    assert (d / "thesis.tex").read_text() == "x"


def test_resume_of_a_run_killed_before_its_first_checkpoint_keeps_other_files(small_store, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".sae_run").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')  # what a SIGKILLed run leaves
    (run / "notes.txt").write_text("mine")
    train(_cfg(small_store, run, resume=True), quiet=True)
    assert (run / "notes.txt").read_text() == "mine" and (run / "sae_weights.safetensors").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 12  # rewritten from step 0
